"""What every stage that asks a vision-language model shares: the model, its prompt template and how it is run."""
from __future__ import annotations

from pydantic import Field, model_validator

from .common import StageConfig
from .serving import EngineConfig, ImageCaps, check_launcher


class VLMStageConfig(StageConfig):
    model: str
    template: str
    max_new_tokens: int = Field(128, ge=1)
    trust_remote_code: bool = False
    engine: EngineConfig = EngineConfig()  # in-process, or an OpenAI-compatible server (schemas/serving.py)
    image: ImageCaps = ImageCaps()  # pixel caps = image-token caps

    @model_validator(mode="after")
    def _chat_launcher(self) -> "VLMStageConfig":
        check_launcher(self.engine, type(self).__name__.removesuffix("Config").lower(), head_judge=False)
        return self


"""In this process: transformers `generate` on the stage's device (`engine.backend: transformers`, the default)."""
from . import VLMEngine

KINDS = (VLMEngine("in_process", backend="transformers", loader="vlm_engine:in_process", rank=0),)

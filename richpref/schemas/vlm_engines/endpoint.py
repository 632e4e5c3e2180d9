"""A running OpenAI-compatible server the user started (`engine.backend: server`, `engine.endpoint: http://HOST:PORT/v1`)."""
from . import VLMEngine

KINDS = (VLMEngine("endpoint", backend="server", loader="vlm_client:connect", rank=1),)

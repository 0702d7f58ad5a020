"""The seam: what every layer may say to an engine, and nothing more.

This package sits at the bottom of Cumulo (it imports only `cumulo.errors`), so the service, the CLI, the pool
and the engines themselves all speak the same few types whether an engine runs in this process, in another
process, or on another machine:

- `EngineClient`: how a caller reaches one served model (generate, abort, health, shutdown);
- `SamplingParams`: what a request asks for; `RequestOutput`: what one step added to it (a delta);
- `Tokenizer`: what a caller may ask of a model's tokenizer; `ModelInfo`: the served model's identity.
"""

from cumulo.contracts.engine_client import EngineClient, EngineHealth
from cumulo.contracts.model_info import ModelInfo
from cumulo.contracts.params import AdapterRef, RequestOutput, SamplingParams, TokenLogprob
from cumulo.contracts.tokenizer import Tokenizer

__all__ = [
    "AdapterRef",
    "EngineClient",
    "EngineHealth",
    "ModelInfo",
    "RequestOutput",
    "SamplingParams",
    "TokenLogprob",
    "Tokenizer",
]

"""sarathi: an LLM inference engine with SARATHI scheduling (chunked prefills, decode-maximal batches).

The public names load lazily (PEP 562), so ``import sarathi`` and ``sarathi --help`` do not import
torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "LLM": "sarathi.llm",
    "LLMEngine": "sarathi.engine",
    "EngineArgs": "sarathi.config",
    "SamplingParams": "sarathi.sampling_params",
    "StructuredOutputsParams": "sarathi.sampling_params",
    "CompletionOutput": "sarathi.outputs",
    "RequestOutput": "sarathi.outputs",
}
__all__ = ["LLM", "CompletionOutput", "EngineArgs", "LLMEngine", "RequestOutput", "SamplingParams",
           "StructuredOutputsParams", "__version__"]

if TYPE_CHECKING:
    from sarathi.config import EngineArgs
    from sarathi.engine import LLMEngine
    from sarathi.llm import LLM
    from sarathi.outputs import CompletionOutput, RequestOutput
    from sarathi.sampling_params import SamplingParams, StructuredOutputsParams


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sarathi' has no attribute {name!r}")

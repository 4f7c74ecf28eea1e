"""sarathi: an LLM inference engine with SARATHI scheduling (chunked prefills, decode-maximal batches)."""

from sarathi.config import EngineArgs
from sarathi.engine import LLMEngine
from sarathi.llm import LLM
from sarathi.outputs import CompletionOutput, RequestOutput
from sarathi.sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "EngineArgs", "LLMEngine", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"

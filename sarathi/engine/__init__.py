"""The engine: input processing, the schedule -> execute -> update loop, output processing."""

from sarathi.engine.group import PromptType, RequestGroup
from sarathi.engine.llm_engine import EngineStats, LLMEngine, StepRecord

__all__ = ["EngineStats", "LLMEngine", "PromptType", "RequestGroup", "StepRecord"]

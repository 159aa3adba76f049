"""The early-exit runtime: torch and transformers only, no serving framework."""
from engine.config import EngineConfig, SamplingParams
from engine.engine import GenerationResult, LLMEngine, RequestError
from engine.sequence import ExitRecord, RequestOutput, StepOutput
from engine.store import CheckpointError

__all__ = ["CheckpointError", "EngineConfig", "ExitRecord", "GenerationResult", "LLMEngine", "RequestError",
           "RequestOutput", "SamplingParams", "StepOutput"]

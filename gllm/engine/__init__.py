"""The engine: request lifecycle, the stepping thread, async and synchronous APIs."""

from gllm.engine.engine import LLMEngine
from gllm.engine.params import GeneratorParams
from gllm.engine.request import GenerationRequest, GenerationResult, StepInfo, StreamEvent, Timings, Usage
from gllm.engine.sinks import RequestHandle

__all__ = ["GenerationRequest", "GenerationResult", "GeneratorParams", "LLMEngine", "RequestHandle", "StepInfo", "StreamEvent",
           "Timings", "Usage"]

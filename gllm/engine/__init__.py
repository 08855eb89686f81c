"""The engine: request lifecycle, the stepping thread, async and synchronous APIs."""

from gllm.engine.engine import LLMEngine
from gllm.engine.errors import EngineBusy, RequestRejected, RequestTooLong
from gllm.engine.params import GeneratorParams
from gllm.engine.request import GenerationRequest, GenerationResult, StepInfo, StreamEvent, Timings, Usage
from gllm.engine.sinks import RequestHandle

__all__ = ["EngineBusy", "GenerationRequest", "GenerationResult", "GeneratorParams", "LLMEngine", "RequestHandle",
           "RequestRejected", "RequestTooLong", "StepInfo", "StreamEvent",
           "Timings", "Usage"]

"""The runner wing: from a scheduled step to logits on the device.

`fast_path` decides once which kernels and graphs run; `ModelRunner` flattens a scheduled step into a
`ForwardBatch` with its typed attention plan (or replays a CUDA graph: `cuda_graphs`, `prefill_graphs`,
whose inputs cross in one copy: `step_inputs`) and returns a `StepOutput`. The engine owns requests; this
wing sees sequences' token ids, positions and block tables only.
"""

from gllm.runner.fast_path import FastPath, RunnerConfig, choose_fast_path
from gllm.runner.model_runner import ModelRunner
from gllm.runner.step_output import StepOutput

__all__ = ["FastPath", "ModelRunner", "RunnerConfig", "StepOutput", "choose_fast_path"]

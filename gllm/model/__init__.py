"""Llama 3.x model: config, forward pass over a flat paged batch, loaders."""

from gllm.model.batch import ForwardBatch
from gllm.model.config import ModelConfig, RopeConfig, parse_dtype
from gllm.model.llama import LlamaForCausalLM
from gllm.model.loader import build_model, load_hf_folder

__all__ = ["ForwardBatch", "LlamaForCausalLM", "ModelConfig", "RopeConfig", "build_model", "load_hf_folder",
           "parse_dtype"]

"""The engine's command-line flags, declared once for every server command (`gllm serve`,
`python -m gllm.bridge`, `python -m gllm.http`), and the `GeneratorParams` they describe."""

from __future__ import annotations

import argparse

from gllm.frontend.helpers import positive

# (flag, kind, help) of the sizing flags: each a number > 0, or absent for the engine's default
_SIZING = (("--max-batch-size", int, "sequences decoding at once"),
           ("--max-seq-len", int, "prompt + output tokens of one request"),
           ("--block-size", int, "tokens per KV block"),
           ("--max-step-tokens", int, "tokens computed per engine step"),
           ("--kv-cache-tokens", int, "KV cache capacity in tokens"),
           ("--kv-cache-mb", float, "or a KV cache budget in MiB"),
           ("--cpu-threads", int, "torch threads on CPU"),
           ("--grammar-threads", int, "threads computing structured-output masks (default: 1 on the CPU, half "
                                      "the cores up to 8 beside a GPU)"),
           ("--max-waiting-requests", int, "requests queued beyond which new ones are refused (busy / 503)"))


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """``--model``, ``--device`` and the "engine" group (sizing, dtype, prefix caching, priority)."""
    p.add_argument("--model", default=None,
                   help="known name, HF-format folder, .gguf or HF cache id (default: the default model)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    eng = p.add_argument_group("engine")
    for flag, kind, text in _SIZING:
        eng.add_argument(flag, type=positive(kind, flag), default=None, help=text)
    eng.add_argument("--dtype", default=None, help="auto, float32, bfloat16, float16")
    eng.add_argument("--quantization", choices=("float", "int8", "int4", "q4_k_m"), default=None,
                     help="the decoder layers' weights: default as the model stores them (a GGUF's "
                          "quantized blocks kept as they are); float: dequantized; int8 per channel, int4 in "
                          "groups (weight-only, on load); q4_k_m (GPU): llama.cpp's Q4_K_M mix, on load")
    eng.add_argument("--quant-group-size", type=int, default=None, choices=(32, 64, 128, 256),
                     help="int4: weights per scale and zero along K (default 32)")
    eng.add_argument("--no-prefix-caching", action="store_true", help="turn prefix caching off")
    eng.add_argument("--compute-nice", type=int, default=None, choices=range(0, 20), metavar="0-19",
                     help="lower the engine's compute threads' OS priority by this, so the game comes first "
                          "(default 10; 0 keeps the server's priority)")
    eng.add_argument("--compute-idle", action="store_true",
                     help="run the engine's compute threads in the OS's idle scheduling class (Linux SCHED_IDLE, "
                          "Windows idle priority): they use only cores the game leaves free")
    eng.add_argument("--no-layer-pauses", action="store_true",
                     help="on the CPU, never pause a step between layers for the game's next idle window")
    eng.add_argument("--result-cache-entries", type=int, default=None, metavar="N",
                     help="results of deterministic requests kept for repeats (default 512; 0: off)")
    eng.add_argument("--prompt-as-text", action="store_true",
                     help="encode special-token strings in a raw prompt as text too (chat messages always are)")


def generator_params(args: argparse.Namespace):
    """The `GeneratorParams` of parsed engine flags (ValueError if they do not fit together)."""
    from gllm.engine import GeneratorParams
    from gllm.engine.params import SERVER_COMPUTE_NICE
    fields = {"max_batch_size": args.max_batch_size, "max_seq_len": args.max_seq_len, "block_size": args.block_size,
              "max_step_tokens": args.max_step_tokens, "kv_cache_tokens": args.kv_cache_tokens,
              "kv_cache_mb": args.kv_cache_mb, "cpu_threads": args.cpu_threads, "dtype": args.dtype,
              "grammar_threads": args.grammar_threads,
              "max_waiting_requests": args.max_waiting_requests, "quantization": args.quantization,
              "quant_group_size": args.quant_group_size}
    fields["result_cache_entries"] = getattr(args, "result_cache_entries", None)
    fields = {k: v for k, v in fields.items() if v is not None}
    if args.no_prefix_caching:
        fields["enable_prefix_caching"] = False
    if args.prompt_as_text:
        fields["prompt_special_tokens"] = False
    fields["compute_nice"] = SERVER_COMPUTE_NICE if args.compute_nice is None else args.compute_nice
    if getattr(args, "compute_idle", False):
        fields["compute_idle"] = True
    if getattr(args, "no_layer_pauses", False):
        fields["layer_pauses"] = False
    return GeneratorParams(**fields)

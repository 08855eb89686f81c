#!/usr/bin/env bash
# On a GPU machine: the GPU tests, the engine tests on CUDA, the benchmarks. Each part fits one 10-minute call;
# name the parts to run (default: all, in this order):
#   GLLM_TEST_HOME=.fixtures bash tools/gpu_check.sh [tests] [engine] [bench] [structured] [frame] [quant8b]
#       [-- bench_gpu args...]
# (frame and quant8b are not in the default list: #18's GPU variant, and #22's 8B int4 decode with its profile.)
# Needs the Llama 3 tokenizer folder in $GLLM_TEST_HOME/tokenizer-llama3 (the fixtures' models are rebuilt
# there with transformers; no npm needed when the tokenizer is present), and on the path what the GPU image
# lacks: llguidance, gguf, and for the tests and engine parts jsonschema with attrs, referencing, rpds-py and
# jsonschema-specifications (the stream-gate tests import the structured-output ones); pyzmq and msgpack for
# frame. A machine without network takes them as wheels (pip download --platform manylinux...).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/gllm-gpu}"; mkdir -p "$OUT"
parts=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do parts+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
[ ${#parts[@]} -eq 0 ] && parts=(tests engine bench structured)
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
python3 tools/make_test_models.py
for part in "${parts[@]}"; do
  case "$part" in
    tests)
      python3 -m pytest -q -p no:cacheprovider -o faulthandler_timeout=120 tests/test_gpu.py \
        tests/test_gpu_quant_gemv.py tests/test_gpu_quant_model.py tests/test_stream_gate.py 2>&1 | tee "$OUT/test_gpu.log" ;;
    engine)
      # (the npc_actions example's test fetches the default model from PyPI: the GPU machine has no network)
      GLLM_TEST_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider -o faulthandler_timeout=120 tests/test_engine.py \
        tests/test_structured_output.py tests/test_snapshot.py \
        --deselect tests/test_structured_output.py::test_the_npc_actions_example_parses_every_reply_on_the_default_model \
        2>&1 | tee "$OUT/test_engine_cuda.log" ;;
    bench)
      python3 tools/bench_gpu.py --tokenizer "$GLLM_TEST_HOME/tokenizer-llama3" --out "$OUT/bench_gpu.json" "$@" 2>&1 | tee "$OUT/bench.log"
      python3 tools/bench_quant_gemv.py --rows 1,4 --models 8b,1b --out "$OUT/bench_quant_gemv.json" 2>&1 | tee "$OUT/bench_quant_gemv.log" ;;
    structured)   # batch 1, 4 and 16: masks computed then sampled (0), and behind the stream gate (1, the default)
      python3 tools/make_random_model.py --shape 1b --tokenizer "$GLLM_TEST_HOME/tokenizer-llama3" --out /tmp/gllm-llama-1b > /dev/null
      for rows in 0 1; do
        python3 tools/bench_structured.py --model /tmp/gllm-llama-1b --device cuda --tokens 256 --batches 1,4,16 --repeats 3 \
          --phases --mask-gate-rows "$rows" --out "$OUT/bench_structured_gate$rows.json" 2>&1 | tee -a "$OUT/bench_structured.log"
      done ;;
    frame)   # issue 18's GPU variant: a render at 90 % of the frame beside gllm serve (needs pyzmq, msgpack)
      python3 tools/make_random_model.py --shape 1b --tokenizer "$GLLM_TEST_HOME/tokenizer-llama3" --out /tmp/gllm-llama-1b > /dev/null
      python3 tools/bench_frame.py --model /tmp/gllm-llama-1b --device cuda --game-device cuda --work 0.9 --seconds 20 \
        --warmup-s 4 --runs no-llm,llm-plain,llm-windowed,llm-windowed --out "$OUT/bench_frame.json" \
        --plot "$OUT/bench_frame.png" 2>&1 | tee "$OUT/bench_frame.log" ;;
    quant8b)   # issue 22: 8B quantized on load (QUANT: q4_k_m, the default, or int4), batch-1 decode against
               # its floor, and where a token's time goes
      python3 tools/bench_gpu.py --tokenizer "$GLLM_TEST_HOME/tokenizer-llama3" --shapes 8b --skip-peer --skip-throughput \
        --kv-tokens 65536 --quantization "${QUANT:-q4_k_m}" 2>&1 | tee "$OUT/bench_quant8b.log"
      python3 tools/profile_decode.py --tokenizer "$GLLM_TEST_HOME/tokenizer-llama3" --shape 8b --quantization "${QUANT:-q4_k_m}" \
        --steps 16 2>&1 | tee -a "$OUT/bench_quant8b.log" ;;
    *) echo "unknown part: $part (tests, engine, bench, structured, frame, quant8b)"; exit 2 ;;
  esac
done

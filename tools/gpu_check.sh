#!/usr/bin/env bash
# One go on a GPU machine: the GPU tests, the engine tests on CUDA, then the benchmarks.
# Needs the Llama 3 tokenizer folder in $GLLM_TEST_HOME/tokenizer-llama3 (the fixtures' models
# are rebuilt there with transformers; no npm needed when the tokenizer is present).
#   GLLM_TEST_HOME=.fixtures bash tools/gpu_check.sh [bench args...]
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/gllm-gpu}"; mkdir -p "$OUT"
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
python3 tools/make_test_models.py
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_gpu_quant_gemv.py tests/test_gpu_quant_model.py \
  tests/test_stream_gate.py 2>&1 | tee "$OUT/test_gpu.log"
GLLM_TEST_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider tests/test_engine.py tests/test_structured_output.py \
  tests/test_snapshot.py 2>&1 | tee "$OUT/test_engine_cuda.log"
python3 tools/bench_gpu.py --tokenizer "$GLLM_TEST_HOME/tokenizer-llama3" --out "$OUT/bench_gpu.json" "$@" 2>&1 | tee "$OUT/bench.log"
python3 tools/bench_quant_gemv.py --rows 1,4 --models 8b,1b --out "$OUT/bench_quant_gemv.json" 2>&1 | tee "$OUT/bench_quant_gemv.log"
# Structured output at batch 1, 4 and 16: masks computed then sampled (0), and behind the stream gate from 1 and 4 rows.
python3 tools/make_random_model.py --shape 1b --tokenizer "$GLLM_TEST_HOME/tokenizer-llama3" --out /tmp/gllm-llama-1b > /dev/null
for rows in 0 1 4; do
  python3 tools/bench_structured.py --model /tmp/gllm-llama-1b --device cuda --tokens 256 --batches 1,4,16 --repeats 3 \
    --phases --mask-gate-rows "$rows" --out "$OUT/bench_structured_gate$rows.json" 2>&1 | tee -a "$OUT/bench_structured.log"
done

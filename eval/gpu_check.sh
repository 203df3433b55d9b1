#!/usr/bin/env bash
# The GPU checks, in one run (at most 8.5 minutes by the steps' limits): the CUDA and Triton tests, then the GPU
# bench suites in bfloat16 on random-weight models of public shapes (no download):
#   1. smollm2-135m shape at 8K, batch 1: every cache's decode step against DynamicCache's;
#   2. Llama-3.1-8B shape at 32K, batch 4: K8V4, K4V2 and leankv-adakv against DynamicCache;
#   3. capacity at 32K: the largest batch each method decodes within 40 GiB above the weights, and its tokens/s;
#   4. where a decode step's time goes at 8K (kernel launches per step, heaviest operations).
# Results go to eval/results/gpu_* and, where $OUT is set (the device tool), into $OUT/gpu_results.tgz.
# Wheels in .whl/ (a transformers newer than the machine's) are installed first, without network; fetch them here with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl transformers==5.23.0
set -uo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
LEANKV="$PY -m leankv_hf.cli"
LOG=${OUT:-eval/results}/gpu_check.log
status=0
step() {  # a step's failure is reported, and the next steps still run
    echo "== $*" | tee -a "$LOG"
    "$@" 2>&1 | tee -a "$LOG" || { echo "== FAILED ($?): $*" | tee -a "$LOG"; status=1; }
}

: >"$LOG"
step nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
step $PY -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)"
step timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_triton.py
step timeout 100 $LEANKV bench --model random:smollm2-135m --device cuda --dtype bfloat16 --lengths 8192 \
    --decode-tokens 32 --repeats 2 --out eval/results/gpu_smollm2_8k \
    --methods full,hetero:k8v4,hetero:k4v2,sparse:adakv@0.2,unified:leankv,unified:leankv-adakv
step timeout 120 $LEANKV bench --model random:llama-3.1-8b --device cuda --dtype bfloat16 --lengths 32768 --batch 4 \
    --decode-tokens 16 --repeats 1 --out eval/results/gpu_llama8b_32k \
    --methods full,hetero:k8v4,hetero:k4v2,unified:leankv-adakv
step timeout 90 $LEANKV bench --model random:llama-3.1-8b --device cuda --dtype bfloat16 --lengths 32768 \
    --capacity-gb 40 --decode-tokens 8 --out eval/results/gpu_capacity_32k --methods full,unified:leankv-adakv
step timeout 40 $PY eval/profile_decode.py --model random:smollm2-135m --length 8192 --steps 2 \
    --methods full,hetero:k8v4,unified:leankv-adakv
if [ -n "${OUT:-}" ]; then
    tar czf "$OUT/gpu_results.tgz" eval/results/gpu_*
fi
exit $status

#!/usr/bin/env bash
# On the lent GPU, after the packages of ../shared/GPU.md are in /tmp/site: stage 2's model (VideoMamba-M + a
# BERT-base-shaped text encoder with fusion layers) forward+backward with the official losses (bench/stage2_step.py),
# then bench/gpu_eval.sh (the CUDA tests and the MSRVTT-1k evaluation benchmark). Logs go to $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
out=${OUT:-/tmp/gpu-stage2}; mkdir -p "$out"
python -m bench.stage2_step --size middle --batch 16 --frames 8 --steps 5 2>&1 | tail -n 20 | tee "$out/stage2_step.txt"
python -m pytest -q -p no:cacheprovider -rA tests/eval/test_eval_cuda.py 2>&1 | grep -E "PASSED|FAILED|ERROR|passed|failed" | tee "$out/eval_cuda.txt"
OUT=$out bash bench/gpu_eval.sh "$@"

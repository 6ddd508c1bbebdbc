#!/usr/bin/env bash
# On the lent GPU, after the packages of ../shared/GPU.md are in /tmp/site (DALI, av, open_clip, deepspeed, ...):
# the CUDA tests (evaluation, fused mixer, CUDA graphs) and the MSRVTT-1k-shaped evaluation benchmark
# (bench/eval_retrieval.py: VideoMamba-M + a BERT-base-shaped text encoder, k_test 128 both ways). Logs go to $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
out=${OUT:-/tmp/gpu-eval}; mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
# (tests/models/test_bimamba_triton.py and test_rmsnorm_triton.py run Triton's interpreter, a CPU check: the
# fused kernels themselves are checked on the GPU by `python -m bench.fused --quick`)
python -m pytest -q -p no:cacheprovider tests/eval/test_eval_cuda.py tests/models/test_mixer.py \
    tests/engine/test_graphs.py 2>&1 | tail -n 15 | tee "$out/cuda_tests.txt"
python -m bench.eval_retrieval --videos 1000 --frames 8 --size 224 --k-test 128 --runs 2 --workers 16 "$@" 2>&1 | tee "$out/eval_retrieval.txt"

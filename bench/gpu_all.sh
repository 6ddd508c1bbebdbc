#!/usr/bin/env bash
# Every GPU measurement of bench/RESULTS.md in one call on the lent H100 (packages brought as ../shared/GPU.md says:
# /tmp/site holds DALI, av, webdataset, fsspec; /tmp/mambasite the mamba-ssm build). Tables go to $OUT/*.md.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
out=${OUT:-/tmp/bench-out}; mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -m bench.data --decoder cpu dali --device cuda --frames 8 16 --workers 16 2>&1 | tee "$out/data.md"
bash /tmp/gpu/build-mamba.sh wait
export PYTHONPATH=/tmp/mambasite:$PYTHONPATH
python -c "import mamba_ssm; print('mamba_ssm', mamba_ssm.__version__)"
python -m bench.scan --device cuda 2>&1 | tee "$out/scan.md"
python -m bench.backbone --device cuda --sizes tiny small --frames 8 16 32 64 --backends mamba_ssm triton --repeats 5 2>&1 | tee "$out/backbone.md"
python -m bench.backbone --device cuda --sizes middle --frames 8 16 --backends mamba_ssm --repeats 5 2>&1 | tee "$out/backbone_middle.md"

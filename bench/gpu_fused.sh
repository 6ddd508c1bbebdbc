#!/usr/bin/env bash
# All checks of the fused bidirectional scan on the lent GPU in one call (issue 7), writing logs under $OUT:
#   bash bench/gpu_fused.sh            (carry .gpu1 packed with mamba-ssm's source archive, ../shared/gpu/pack.sh)
# 1. starts mamba-ssm's CUDA build in the background (about 3 minutes), 2. bench/fused.py: correctness, the scan
# sweep against the memory floor and the Ti block stacks, 3. once mamba-ssm is built: its scan and its plain
# BiMamba stack (fused.py --mamba-only) and bench/backbone.py (VideoMamba-Ti, triton vs mamba_ssm vs the ViT).
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT/mamba"
if [ -d .gpu1 ]; then
  bash .gpu1/unpack.sh add .gpu1 > /dev/null && bash /tmp/gpu/build-mamba.sh
fi
python3 -m bench.fused --out "$OUT" 2>&1 | tee "$OUT/fused.log" | grep -v "^|" | grep -v "^\s*$" | tail -25
grep "^|" "$OUT/fused.log"
if [ -d .gpu1 ]; then
  bash /tmp/gpu/build-mamba.sh wait > /dev/null
  export PYTHONPATH=/tmp/mambasite:${PYTHONPATH:-}
  python3 -m bench.fused --mamba-only --out "$OUT/mamba" 2>&1 | tee "$OUT/fused_mamba.log" | grep "^|"
fi
python3 -m bench.backbone --sizes tiny --frames 8 64 --backends triton mamba_ssm --repeats 5 2>&1 \
  | tee "$OUT/backbone.log" | tail -14

#!/usr/bin/env bash
# Issue 23 on the lent H200: the official VideoMamba kernels build in the background (detached, niced) while this
# project's stage-1 and stage-2 steps are measured (bench/train_step.py: synthetic input, DALI, the CPU decoder, the
# loader's ceilings); then the official code's backbone, stage-1 and stage-2 steps (bench/official_step.py), this
# project's backbone (bench/backbone.py) and the comparison (train_step.py --summary, always written). Everything goes
# to $OUT: *.json, *.log, summary.md, steps.txt (each step's rc and seconds).
#
#   bash bench/pack_official.sh                     # here, once: writes .official/ (2 MB)
#   device call (carry [".official"]):  bash bench/gpu_train_step.sh [all|ours|official]
#   device call:  bash bench/gpu_train_step.sh grads       # ours with fp32 (the recipes') against bf16 gradients
#                                                          # (4 runs, ~4 min on the H200)
#   device call:  bash bench/gpu_train_step.sh images      # stage 2 on batches of 1-frame images (data.mix=batch),
#                                                          # then images and clips in turn (~2 min)
#   device call:  bash bench/gpu_train_step.sh loader      # the loader per decoder (dali, cpu, hybrid): ceilings
#                                                          # and the stage-1 step it feeds (~4 min)
#   device call:  bash bench/gpu_train_step.sh text        # stage 2's BERT layers as CUDA graphs: the GPU tests of
#                                                          # the chains and flat bf16 gradients, then stage 2 with
#                                                          # the backbone's graphs only, with text + fusion too,
#                                                          # the same with DeepSpeed's per-tensor gradient fold,
#                                                          # stage 1, and stage 2 on images and clips in turn
#                                                          # (~8 min; the most wanted first)
#
# Packages come from /tmp/site (../shared/GPU.md: deepspeed, open-clip-torch, DALI, av, webdataset, ...). `all` (the
# default) tries everything in one call; no step runs past DEADLINE (575 s from the start, 40 s of it kept for the
# summary), so a slow step costs the later ones, never the record. Two calls are safer: `ours` (starts the build,
# then this project's steps and backbone) and, while the machine is warm, `official` (waits for the build in
# /tmp/official, then the official parts). Every step is guarded: a failure is logged with its rc, the rest goes on.
# Knobs: STEPS (timed steps per run, default 8), OFFICIAL_STEPS (default 8), CPU_WORKERS (default 12, the official
# stage 1's num_workers), SOURCE_VIDEOS (default 256), DEADLINE, STAGE_LIMIT (seconds per stage of ours, default 240),
# OFFICIAL_LIMIT (default 450), SOURCE_FRAMES (frames per synthetic clip, default 90), SOURCE_KEYINT (shards
# re-encoded with a key frame every N frames, for the CPU decoder's restarts; default: not re-encoded), STAGES (the
# grads phase's stages, default "1 2"), LOADER_DATA (the loader phase's decoders, default "dali cpu hybrid"; "cpu"
# needs no DALI on the machine).
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
out=${OUT:-/tmp/train-step}; mkdir -p "$out"
phase=${1:-all}
steps=${STEPS:-8}
official_steps=${OFFICIAL_STEPS:-8}
cpu_workers=${CPU_WORKERS:-12}
videos=${SOURCE_VIDEOS:-256}
official=/tmp/official
data=/tmp/train-step-data
repo=$PWD
stage_limit=${STAGE_LIMIT:-240}
official_limit=${OFFICIAL_LIMIT:-450}
deadline=${DEADLINE:-575}  # seconds from the start: a device call is stopped at 600
reserve=40                  # kept for the summary at the end
begin=$(date +%s)

log() { echo "[$(date +%T) +$(( $(date +%s) - begin ))s] $*" | tee -a "$out/steps.txt"; }
step() {  # step NAME SECONDS CMD...: CMD with a time limit (never past the call's deadline less the summary's
          # reserve), its output in $OUT/NAME.log; never fails the script
  local name=$1 limit=$2; shift 2
  local left=$(( deadline - reserve - ($(date +%s) - begin) ))
  [ "$name" = summary ] && left=$(( deadline - ($(date +%s) - begin) ))
  if [ "$left" -lt 20 ]; then log "skip $name: the call's deadline is near (DEADLINE=$deadline s)"; return 0; fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0; t0=$(date +%s)
  log "start $name (limit $limit s): $*"
  timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  log "end $name: rc=$rc, $(( $(date +%s) - t0 )) s"
  tail -n 25 "$out/$name.log"
  return 0
}

start_build() {  # extracts, patches and builds the official kernels in place, in the background (detached)
  if [ -e "$official/BUILD.started" ]; then log "official build already started"; return 0; fi
  if [ ! -f "$repo/.official/official.tar.gz" ]; then
    log "no .official/ carried (run bash bench/pack_official.sh here, then carry .official)"; return 0
  fi
  rm -rf "$official"; mkdir -p "$official"
  tar xzf "$repo/.official/official.tar.gz" -C "$official" && cp "$repo/.official/COMMIT" "$official/COMMIT"
  if ! (cd "$official" && patch -p1 --quiet < "$repo/.official/official-videomamba-sm90.patch"); then
    log "the sm_90 patch did not apply"; return 0
  fi
  date +%s > "$official/BUILD.started"
  nvcc --version 2>&1 | tail -n 2 > "$out/nvcc.txt"
  for spec in causal-conv1d:CAUSAL_CONV1D:4 mamba:MAMBA:11; do
    IFS=: read -r dir var jobs <<< "$spec"
    # nice 19: the builds yield the CPU to the measurements running meanwhile (GPU.md's build times were measured
    # without them); setsid nohup: a build outlives this call (the `official` phase of the next call waits for it)
    cat > "$official/build_$dir.sh" <<SH
cd "$official/$dir"
t0=\$(date +%s)
TORCH_CUDA_ARCH_LIST=9.0 ${var}_FORCE_BUILD=TRUE MAX_JOBS=$jobs nice -n 19 python3 setup.py build_ext --inplace \
  > "$out/build_$dir.log" 2>&1
echo "{\"rc\": \$?, \"seconds\": \$(( \$(date +%s) - t0 ))}" > "$official/$dir.done"
SH
    setsid nohup bash "$official/build_$dir.sh" > /dev/null 2>&1 &
  done
  log "official build started in the background (causal-conv1d MAX_JOBS=4, mamba MAX_JOBS=11, nice 19)"
}

wait_build() {
  if [ ! -e "$official/BUILD.started" ]; then start_build; fi
  if [ ! -e "$official/BUILD.started" ]; then return 0; fi
  while [ ! -e "$official/causal-conv1d.done" ] || [ ! -e "$official/mamba.done" ]; do
    if [ $(( $(date +%s) - begin )) -gt $(( deadline - reserve - 60 )) ]; then
      log "the official build is still running; run this script's official phase in the next call"; return 0
    fi
    sleep 5
  done
  python3 - "$official" <<'PY' | tee "$out/build.json"
import json, sys, os
root = sys.argv[1]
started = int(open(os.path.join(root, "BUILD.started")).read())
parts = {d: json.load(open(os.path.join(root, f"{d}.done"))) for d in ("causal-conv1d", "mamba")}
wall = max(os.path.getmtime(os.path.join(root, f"{d}.done")) for d in parts) - started
record = {"parts": parts, "wall_seconds_both_in_parallel": round(wall), "arch": "sm_90",
          "jobs": {"causal-conv1d": 4, "mamba": 11}, "niced": True}
json.dump(record, open(os.path.join(root, "BUILD.json"), "w"))
print(json.dumps(record))
PY
}

shards() {
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
  local keyint=()
  [ -n "${SOURCE_KEYINT:-}" ] && keyint=(--source-keyint "$SOURCE_KEYINT")
  step shards 120 python3 -m bench.train_step --make-shards "$data" --shards-only --source-videos "$videos" \
    --source-frames "${SOURCE_FRAMES:-90}" "${keyint[@]}"
}

ours() {
  shards
  local common=(--data synthetic dali cpu --shards "$data/shards/index.json" --cpu-workers "$cpu_workers"
                --steps "$steps" --warmup 3 --split-steps 3 --profile-steps 2 --ops-steps 1 --cpu-steps 3)
  # the loader's ceilings once (a property of the loader, clips/s per decoder): in the stage-1 process
  step stage1 "$stage_limit" python3 -m bench.train_step --stage 1 "${common[@]}" --loader-ceiling --ceiling-clips 512 \
    --json "$out/train_step_stage1.json"
  step stage2 "$stage_limit" python3 -m bench.train_step --stage 2 "${common[@]}" --json "$out/train_step_stage2.json"
}

ours_backbone() {
  step backbone_ours 90 python3 -m bench.backbone --device cuda --sizes middle --frames 8 --batch 4 --backends triton \
    --cuda-graphs --repeats 5
}

official_phase() {
  wait_build
  for d in causal-conv1d mamba; do
    if [ -e "$official/$d.done" ]; then log "build $d: $(cat "$official/$d.done")"; tail -n 3 "$out/build_$d.log"; fi
  done
  step official "$official_limit" python3 -m bench.official_step --official "$official" --steps "$official_steps" --warmup 3 \
    --profile-steps 2 --part-timeout 150 --json "$out/official.json"
}

grads() {  # the optimizer-step lever (bench/RESULTS.md, issue 23): each stage on synthetic input with the recipes'
           # fp32 gradient accumulation (DeepSpeed's BF16_Optimizer) and with bf16 gradients (its ZeRO-1 optimizer)
  local common=(--data synthetic --steps "$steps" --warmup 3 --split-steps 3 --profile-steps 2 --ops-steps 1)
  for s in ${STAGES:-1 2}; do
    step "stage$s" "$stage_limit" python3 -m bench.train_step --stage "$s" "${common[@]}" \
      --json "$out/train_step_stage$s.json"
    step "stage${s}_bf16grads" "$stage_limit" python3 -m bench.train_step --stage "$s" "${common[@]}" \
      --override train.grad_accum_dtype=null --json "$out/train_step_stage${s}_bf16grads.json"
  done
}

loader() {  # the loader alone (ceilings) and feeding the stage-1 step, per decoder: DALI (streams trimmed to the
            # planned frames), PyAV in the workers (8-bit hand-over), hybrid (both); no split or profile (~4 min)
  shards
  local decoders
  read -r -a decoders <<< "${LOADER_DATA:-dali cpu hybrid}"
  step stage1_loader "$stage_limit" python3 -m bench.train_step --stage 1 --data synthetic "${decoders[@]}" \
    --shards "$data/shards/index.json" --cpu-workers "$cpu_workers" --steps "$steps" --warmup 3 --split-steps 0 \
    --profile-steps 0 --cpu-steps 3 --loader-ceiling --ceiling-clips 512 --json "$out/train_step_stage1_loader.json"
}

images() {  # what whole batches of 1-frame images cost in stage 2 (data.mix=batch mask.image_ratio=0.5, the
            # official image batches): all images, then images and clips in turn (each kind its own CUDA graphs)
  local common=(--stage 2 --data synthetic --steps "$steps" --warmup 3 --split-steps 3 --profile-steps 2 --ops-steps 1)
  for media in images alternate; do
    step "stage2_$media" "$stage_limit" python3 -m bench.train_step "${common[@]}" "--$media" \
      --json "$out/train_step_stage2_$media.json"
  done
}

text() {  # train.cuda_graph_chains: BERT's text-only and fusion layers replayed as CUDA graphs beside the backbone's
          # (stage 2's GPU-busy lever, bench/RESULTS.md); first the chains' GPU tests (replayed against eager) and the
          # flat bf16 gradients' (pipeline.engine.flat_grads); then stage 2 with the flat gradients and each set of
          # chains, DeepSpeed's per-tensor fold for comparison, and stage 1
  # DS_ACCELERATOR=cuda: the DeepSpeed ZeRO-2 run with graphs is among them (tests/engine/conftest.py defaults to cpu)
  step graph_tests 150 env DS_ACCELERATOR=cuda python3 -m pytest -q -p no:cacheprovider tests/engine/test_graphs.py \
    tests/models/test_text.py tests/engine/test_flat_grads.py tests/test_masking.py
  local common=(--data synthetic --steps "$steps" --warmup 3 --split-steps 3 --profile-steps 2 --ops-steps 1
                --trace-dir "$out/traces")
  step stage2_text_graphs "$stage_limit" python3 -m bench.train_step --stage 2 "${common[@]}" \
    --override "train.cuda_graph_chains=[backbone,text,fusion]" --json "$out/train_step_stage2_text_graphs.json"
  step stage2_text_graphs_per_tensor_grads "$stage_limit" python3 -m bench.train_step --stage 2 "${common[@]}" \
    --per-tensor-grads --override "train.cuda_graph_chains=[backbone,text,fusion]" \
    --json "$out/train_step_stage2_text_graphs_per_tensor_grads.json"
  step stage1 "$stage_limit" python3 -m bench.train_step --stage 1 "${common[@]}" --json "$out/train_step_stage1.json"
  step stage2_backbone_graphs "$stage_limit" python3 -m bench.train_step --stage 2 "${common[@]}" \
    --override "train.cuda_graph_chains=[backbone]" --json "$out/train_step_stage2_backbone_graphs.json"
  step stage2_alternate_text_graphs "$stage_limit" python3 -m bench.train_step --stage 2 "${common[@]}" --alternate \
    --override "train.cuda_graph_chains=[backbone,text,fusion]" \
    --json "$out/train_step_stage2_alternate_text_graphs.json"
}

case "$phase" in
  all) start_build; ours; official_phase; ours_backbone;;
  ours) start_build; ours; ours_backbone;;
  official) official_phase;;
  grads) grads;;
  images) images;;
  loader) loader;;
  text) text;;
  *) echo "usage: bash bench/gpu_train_step.sh [all|ours|official|grads|images|loader|text]" >&2; exit 2;;
esac
step summary 60 python3 -m bench.train_step --summary "$out"
cp "$out/summary.log" "$out/summary.md" 2>/dev/null
log "done ($phase)"

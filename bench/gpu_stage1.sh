#!/usr/bin/env bash
# Stage 1 end to end on one GPU (CUDA, NCCL, bf16, ZeRO-2): synthetic corpus -> tars -> a tiny open_clip teacher ->
# `videomamba pretrain` (VideoMamba-Ti, the default scan backend) -> a resume from its checkpoint. It checks the
# CUDA path of the engine and prints the stage's clips/s. Packages come from /tmp/site (../shared/GPU.md: deepspeed,
# open-clip-torch, av, braceexpand, pydantic, hjson); run from the project's root. Logs go to $OUT. Arguments are
# extra config overrides of both runs: `bash bench/gpu_stage1.sh train.cuda_graphs=true`.
set -euo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
out=${OUT:-/tmp/gpu-stage1}; mkdir -p "$out"
work=$(mktemp -d)
python - "$work" <<'PY'
import json
import sys
from pathlib import Path

from pipeline.stages.teacher_warmup import train_tiny_clip
from shards.index import build_index, plan_shards
from shards.manifest import read_manifest
from shards.media import ProcessOptions
from shards.synth import write_corpus
from shards.writer import ShardOptions, write_shard

work = Path(sys.argv[1])
write_corpus(str(work / "corpus"), videos=192, images=0, seed=0, frames=16, eval_videos=8, progress=False)
# the shards written in this process, one after another (the GPU machine has no Ray)
manifest = read_manifest(str(work / "corpus" / "videos.jsonl"))
plans = plan_shards(manifest.rows, 16, "shard", ProcessOptions())
(work / "shards").mkdir()
results = {p.index: write_shard(p, ShardOptions(str(work / "shards"))) for p in plans}
(work / "shards" / "index.json").write_text(json.dumps(build_index(manifest.url, 16, plans, results)))
train_tiny_clip(str(work / "corpus" / "videos.jsonl"), str(work / "teacher" / "tiny_clip.pt"), steps=150)
PY
args=(--config configs/stage1_align.yaml "data.train=$work/shards/index.json" teacher.model=tiny-clip
      "teacher.pretrained=$work/teacher/tiny_clip.pt" teacher.img_size=64 data.img_size=64 data.num_frames=8
      data.decoder=cpu data.num_workers=8 model.size=tiny train.batch_size=16 train.lr=1.0e-3 train.warmup_steps=10
      train.precision=bf16 deepspeed.zero_stage=2 train.ckpt_every=40 train.progress=false "train.out=$work/run" "$@")
python -m pipeline.cli pretrain "${args[@]}" train.max_steps=80 2>&1 | tail -n 5 | tee "$out/stage1.txt"
python -m pipeline.cli pretrain "${args[@]}" train.max_steps=100 --resume auto 2>&1 | tail -n 3 | tee "$out/resume.txt"
python - "$work/run/metrics.jsonl" <<'PY' | tee "$out/metrics.txt"
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
first, last = rows[:10], rows[-10:]
mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)
print(f"steps {rows[0]['step']}..{rows[-1]['step']}; align loss {mean(first, 'loss'):.3f} -> {mean(last, 'loss'):.3f} "
      f"(mean of first/last 10); clips/s median {sorted(r['clips_per_s'] for r in rows[5:])[len(rows[5:]) // 2]:.1f}")
PY

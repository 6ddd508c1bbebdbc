"""Helpers of the stage tests: tiny real shards of the synthetic corpus, the stage-1 command line, running the CLI
in a subprocess and reading a run's metrics (the fixtures are in conftest.py)."""
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TEACHER = "stage-test-vit"


def write_shards(corpus: Path, out: Path, per_shard: int = 4, media: str = "video") -> str:
    """Writes the corpus's training clips (or with media="image" its images) as WebDataset tars
    ({key}.mp4 or .jpg, .txt, .json) with an index.json."""
    records = [json.loads(line) for line in (corpus / f"{media}s.jsonl").read_text().splitlines() if line.strip()]
    media_ext = "mp4" if media == "video" else "jpg"
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for first in range(0, len(records), per_shard):
        name = f"synth-{first // per_shard:06d}.tar"
        with tarfile.open(out / name, "w") as tar:
            for r in records[first:first + per_shard]:
                files = {media_ext: (corpus / r["path"]).read_bytes(), "txt": r["captions"][0].encode(),
                         "json": json.dumps({"captions": r["captions"]}).encode()}
                for ext, data in files.items():
                    info = tarfile.TarInfo(f"{r['key']}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        entries.append({"url": name, "samples": len(records[first:first + per_shard])})
    (out / "index.json").write_text(json.dumps({"shards": entries, "media": media}))
    return str(out / "index.json")


def stage_args(shards, teacher_file, out, steps, extra=()):
    return ["pretrain", "--config", str(REPO / "configs" / "stage1_align.yaml"),
            f"data.train={shards}", f"teacher.model={TEACHER}", f"teacher.pretrained={teacher_file}",
            "teacher.img_size=64", "data.img_size=64", "data.num_frames=4", "data.num_workers=1",
            "model.depth=2", "model.embed_dim=64", "model.scan_backend=torch", "model.drop_path_rate=0.0",
            f"train.max_steps={steps}", "train.batch_size=4", "train.lr=2.0e-3", "train.warmup_steps=5",
            "train.ckpt_every=20", "train.progress=false", "train.tensorboard=false", f"train.out={out}", *extra]


def run_cli(args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]

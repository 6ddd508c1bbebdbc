"""Run the whole pipeline from one config: synthetic corpus -> shards -> teacher -> teacher's zero-shot retrieval ->
stage 1 -> tiny BERT -> stage 2 -> the stage-2 model's zero-shot retrieval.

Each step writes its outputs under --out (corpus/, shards/, teacher/, eval/, stage1/, text/bert/, stage2/,
eval_stage2/, report.md) and a marker `OUT/steps/<step>.json` when it is complete; running the same
command again skips complete steps and resumes the training stages from their newest complete checkpoint, so a run
that was interrupted anywhere continues where it stopped. Delete a step's marker to redo it.

Examples:
  videomamba run --config configs/demo.yaml --out demo_out
  videomamba run --config configs/demo.yaml --out demo_out stage1.overrides='[train.max_steps=50]'
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from pipeline.config import (AlignStageConfig, ConfigError, RetrievalConfig, VideoTextStageConfig, load_config,
                             write_resolved)


@dataclass
class SynthStep:
    videos: int = 240
    images: int = 120
    eval_videos: int = 64
    seed: int = 0
    size: int = 64
    frames: int = 16
    fps: int = 8
    codec: str = "h264"


@dataclass
class ShardStep:
    samples_per_shard: int = 32
    workers: int = 2
    ray_address: Optional[str] = None


@dataclass
class TeacherStep:
    """The demo's teacher: a small open_clip model trained briefly on the synthetic frames, then frozen."""

    steps: int = 300
    img_size: int = 64
    seed: int = 0


@dataclass
class TextStep:
    """The demo's BERT (stage 2's text encoder): a WordPiece vocabulary from the corpus captions and a small random
    BertForMaskedLM, saved in the transformers layout; stage 2 loads it as it loads BERT-base."""

    hidden: int = 128
    layers: int = 4
    heads: int = 4
    vocab_size: int = 1000
    seed: int = 0


@dataclass
class StageStep:
    config: str = ""  # the stage's YAML (relative to this file's folder or the working directory)
    overrides: list[str] = field(default_factory=list)


@dataclass
class RunConfig:
    synth: SynthStep = field(default_factory=SynthStep)
    shard: ShardStep = field(default_factory=ShardStep)
    teacher: TeacherStep = field(default_factory=TeacherStep)
    eval_teacher: StageStep = field(default_factory=StageStep)  # the eval YAML; model and img_size are the teacher's
    stage1: StageStep = field(default_factory=StageStep)
    text: TextStep = field(default_factory=TextStep)
    stage2: StageStep = field(default_factory=StageStep)  # no config: the run stops after stage 1
    eval_stage2: StageStep = field(default_factory=StageStep)  # the eval YAML for the stage-2 model


# the held-out annotation files the demo evaluates on: (dataset name, file under corpus/eval/)
DEMO_EVAL_SETS = (("msrvtt", "msrvtt_test.json"), ("msvd", "msvd_test.json"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="configs/demo.yaml", help="the run config (default: %(default)s)")
    parser.add_argument("--out", default="demo_out", help="folder for every step's outputs (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="overrides of the run config, e.g. synth.videos=100 teacher.steps=50")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(RunConfig, args.config, args.overrides)
    config_dir = os.path.dirname(os.path.abspath(args.config))
    out = os.path.abspath(args.out)
    os.makedirs(os.path.join(out, "steps"), exist_ok=True)
    write_resolved(cfg, os.path.join(out, "run_config.yaml"))
    stage1_cfg = _stage_config(AlignStageConfig, cfg.stage1, config_dir, out, "stage1")  # fail early on bad keys
    eval_cfg = _eval_config(cfg.eval_teacher, config_dir, cfg.teacher.img_size)
    stage2_cfg = _stage2_config(cfg.stage2, config_dir, out) if cfg.stage2.config else None
    eval2_cfg = _eval_stage2_config(cfg.eval_stage2, config_dir) if stage2_cfg else None
    steps: list[tuple[str, Callable[[], dict]]] = [
        ("synth", lambda: _synth(cfg.synth, out)),
        ("shard_videos", lambda: _shard(os.path.join(out, "corpus", "videos.jsonl"), os.path.join(out, "shards",
                                                                                                    "videos"), cfg.shard)),
        ("shard_images", lambda: _shard(os.path.join(out, "corpus", "images.jsonl"), os.path.join(out, "shards",
                                                                                                    "images"), cfg.shard)),
        ("teacher", lambda: _teacher(cfg.teacher, out)),
        ("eval_teacher", lambda: _eval_teacher(eval_cfg, out)),
        ("stage1", lambda: _stage1(stage1_cfg)),
    ]
    if stage2_cfg is not None:
        steps += [("text", lambda: _tiny_bert(cfg.text, out)),
                  ("stage2", lambda: _stage2(stage2_cfg)),
                  ("eval_stage2", lambda: _evaluate(eval2_cfg, os.path.join(out, "stage2"), out, "eval_stage2"))]
    for name, step in steps:
        _run_step(out, name, step)
    table = report(out)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    print(f"videomamba run: all steps complete; outputs under {out}")
    return 0


def report(out: str) -> str:
    """Returns a markdown table of what each step produced, from the steps' markers and the runs' metrics."""
    def marker(name: str) -> dict:
        with open(os.path.join(out, "steps", f"{name}.json")) as f:
            return json.load(f)

    rows = []
    synth = marker("synth")
    rows.append(("synth", f"{synth.get('videos')} videos, {synth.get('images')} images, "
                          f"{synth.get('eval_videos')} held-out eval videos", synth["seconds"]))
    for name in ("shard_videos", "shard_images"):
        m = marker(name)
        rows.append((name, f"{m['samples']} samples in {m['shards']} shards, {m['failed_rows']} failed rows",
                     m["seconds"]))
    with open(os.path.join(out, "teacher", "tiny_clip_metrics.json")) as f:
        t = json.load(f)
    rows.append(("teacher", f"contrastive loss {t['loss_first10']:.2f} -> {t['loss_last10']:.2f}; image->text top-1 "
                            f"held-out {t['held_out']['top1']:.2f} (chance {t['held_out']['chance']:.2f})",
                 marker("teacher")["seconds"]))
    rows.append(("eval_teacher", _eval_summary(marker("eval_teacher")), marker("eval_teacher")["seconds"]))
    stage1 = marker("stage1")
    rows.append(("stage1", _training_summary(stage1["run_dir"], {"alignment loss": "loss"}, digits=3),
                 stage1["seconds"]))
    if os.path.exists(os.path.join(out, "steps", "text.json")):
        text = marker("text")
        rows.append(("text", f"tiny BERT: {text['layers']} layers of {text['hidden']}, a {text['vocab']}-id "
                             f"WordPiece vocabulary from {text['captions']} captions", text["seconds"]))
    if os.path.exists(os.path.join(out, "steps", "stage2.json")):
        stage2 = marker("stage2")
        names = {name: name for name in ("vtc", "vtm", "mlm", "align")}
        rows.append(("stage2", _training_summary(stage2["run_dir"], names, digits=2), stage2["seconds"]))
    if os.path.exists(os.path.join(out, "steps", "eval_stage2.json")):
        rows.append(("eval_stage2", _eval_summary(marker("eval_stage2"), "VideoMamba stage 2"),
                     marker("eval_stage2")["seconds"]))
    lines = ["| step | result | seconds |", "|---|---|---:|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def _training_summary(run_dir: str, losses: dict[str, str], digits: int) -> str:
    """Returns the report's text for a training run: for each {label: metrics key} the run logged, the mean over
    the first and over the last k steps."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    k = max(1, min(10, len(records) // 4))
    changes = []
    for label, key in losses.items():
        values = [r[key] for r in records if key in r]
        if values:
            changes.append(f"{label} {sum(values[:k]) / k:.{digits}f} -> {sum(values[-k:]) / k:.{digits}f}")
    return f"{len(records)} steps; {', '.join(changes)} (mean of first/last {k})"


def _eval_summary(results: dict, model: str = "CLIP meanP") -> str:
    """Returns the report's text for a zero-shot retrieval step (in %, the final scores: re-ranked when the model
    has a matching head): R@1/5/10 both ways in the MSRVTT format (with chance level), R@1 both ways in the MSVD
    format (every caption a query)."""
    msrvtt, msvd = results["msrvtt"], results["msvd"]
    return (f"zero-shot ({model}) T2V R@1 {msrvtt['img_r1']:.1f} / R@5 {msrvtt['img_r5']:.1f} / "
            f"R@10 {msrvtt['img_r10']:.1f}, V2T R@1 {msrvtt['txt_r1']:.1f} (MSRVTT format, {msrvtt['videos']} "
            f"videos; chance 1/{msrvtt['videos']}); MSVD format ({msvd['texts']} captions): T2V R@1 "
            f"{msvd['img_r1']:.1f}, V2T R@1 {msvd['txt_r1']:.1f}; recalls in %, {msrvtt['scores']} scores")


def _run_step(out: str, name: str, step: Callable[[], dict]) -> None:
    marker = os.path.join(out, "steps", f"{name}.json")
    if os.path.exists(marker):
        print(f"[run] {name}: complete (skipping; delete {marker} to redo)")
        return
    print(f"[run] {name}: starting", flush=True)
    start = time.time()
    result = step() or {}
    result["seconds"] = round(time.time() - start, 1)
    tmp = marker + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2, default=str)
    os.replace(tmp, marker)
    print(f"[run] {name}: done in {result['seconds']} s", flush=True)


def _step_yaml(step: StageStep, config_dir: str, name: str) -> str:
    """Returns the path of a step's YAML: relative to the run config's folder when it is there, else as given."""
    if not step.config:
        raise ConfigError(f"run config: {name}.config must name the step's YAML file")
    path = step.config if os.path.isabs(step.config) else os.path.join(config_dir, step.config)
    return path if os.path.exists(path) else step.config


def _stage_config(schema: type, step: StageStep, config_dir: str, out: str, name: str):
    """Returns the stage's config with the demo's own paths (shards, teacher, run dir) filled in."""
    path = _step_yaml(step, config_dir, name)
    wired = [
        f"data.train={os.path.join(out, 'shards', 'videos', 'index.json')}",
        f"teacher.pretrained={os.path.join(out, 'teacher', 'tiny_clip.pt')}",
        f"train.out={os.path.join(out, name)}",
    ]
    return load_config(schema, path, wired + list(step.overrides))


def _eval_config(step: StageStep, config_dir: str, img_size: int) -> RetrievalConfig:
    """Returns the retrieval config of the teacher's evaluation: the step's YAML, the tiny CLIP at the teacher's size."""
    path = _step_yaml(step, config_dir, "eval_teacher")
    from pipeline.stages.teacher_warmup import TINY_CLIP_NAME

    wired = ["model.kind=open_clip", f"model.name={TINY_CLIP_NAME}", f"data.img_size={img_size}"]
    return load_config(RetrievalConfig, path, wired + list(step.overrides))


def _synth(step: SynthStep, out: str) -> dict:
    from shards.synth import write_corpus

    return write_corpus(os.path.join(out, "corpus"), videos=step.videos, images=step.images, seed=step.seed,
                        codec=step.codec, size=step.size, frames=step.frames, fps=step.fps,
                        eval_videos=step.eval_videos)


def _shard(manifest: str, dest: str, step: ShardStep) -> dict:
    from shards.runner import ShardJobConfig, shard_corpus

    outcome = shard_corpus(ShardJobConfig(input=manifest, out=dest, samples_per_shard=step.samples_per_shard,
                                          workers=step.workers, ray_address=step.ray_address))
    if not outcome.ok:
        raise RuntimeError(f"sharding {manifest} left incomplete shards; see {dest}/summary.json and run again")
    return outcome.summary


def _teacher(step: TeacherStep, out: str) -> dict:
    from pipeline.stages.teacher_warmup import train_tiny_clip

    path = train_tiny_clip(os.path.join(out, "corpus", "videos.jsonl"), os.path.join(out, "teacher", "tiny_clip.pt"),
                           steps=step.steps, img_size=step.img_size, seed=step.seed)
    return {"checkpoint": str(path)}


def _eval_teacher(cfg: RetrievalConfig, out: str) -> dict:
    return _evaluate(cfg, os.path.join(out, "teacher", "tiny_clip.pt"), out, "eval")


def _evaluate(cfg: RetrievalConfig, checkpoint: str, out: str, folder_name: str) -> dict:
    """Evaluates a model on the held-out videos in each annotation format; returns per format the counts and
    metrics (the full results are OUT/<folder_name>/retrieval_<dataset>.json/.md/.png)."""
    from pipeline.eval.report import result_markdown
    from pipeline.stages.retrieval import evaluate_retrieval

    folder = os.path.join(out, "corpus", "eval")
    results = {}
    for dataset, file_name in DEMO_EVAL_SETS:
        result = evaluate_retrieval(cfg, checkpoint, dataset, os.path.join(folder, file_name),
                                    os.path.join(folder, "videos"), os.path.join(out, folder_name))
        print(result_markdown(result), flush=True)
        counts = result["counts"]
        final = "reranked" if "reranked" in result["metrics"] else "contrastive"
        results[dataset] = {"videos": counts["videos_evaluated"], "texts": counts["texts_evaluated"],
                            "skipped": counts["videos_skipped"], "chance_r1": result["chance_r1"], "scores": final,
                            **result["metrics"][final], "json": result["outputs"]["json"]}
    return results


def _stage1(cfg: AlignStageConfig) -> dict:
    from pipeline.stages.align import train_align

    return train_align(cfg, resume="auto")


def _stage2_config(step: StageStep, config_dir: str, out: str) -> VideoTextStageConfig:
    """Stage 2's config: video-text and image-text shards, the stage-1 run as its start, the demo's teacher."""
    path = _step_yaml(step, config_dir, "stage2")
    shards = ",".join(os.path.join(out, "shards", kind, "index.json") for kind in ("videos", "images"))
    wired = [f"data.train={shards}", f"init={os.path.join(out, 'stage1')}",
             f"teacher.pretrained={os.path.join(out, 'teacher', 'tiny_clip.pt')}",
             f"text.pretrained={_bert_dir(out)}", f"train.out={os.path.join(out, 'stage2')}"]
    return load_config(VideoTextStageConfig, path, wired + list(step.overrides))


def _bert_dir(out: str) -> str:
    return os.path.join(out, "text", "bert")


def _tiny_bert(step: TextStep, out: str) -> dict:
    """Builds the demo's BERT from the training captions (videos and images) of the corpus."""
    from pipeline.models.text import build_tiny_bert

    captions = []
    for manifest in ("videos.jsonl", "images.jsonl"):
        with open(os.path.join(out, "corpus", manifest)) as f:
            captions += [c for line in f if line.strip() for c in json.loads(line)["captions"]]
    path = build_tiny_bert(captions, _bert_dir(out), hidden=step.hidden, layers=step.layers, heads=step.heads,
                           vocab_size=step.vocab_size, seed=step.seed)
    with open(os.path.join(path, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    return {"bert": path, "captions": len(captions), "hidden": step.hidden, "layers": step.layers, "vocab": vocab}


def _eval_stage2_config(step: StageStep, config_dir: str) -> RetrievalConfig:
    """The retrieval config of the stage-2 model: the step's YAML; frames and size are the run's own (its
    config.yaml) unless the YAML or the step's overrides set them."""
    path = _step_yaml(step, config_dir, "eval_stage2")
    return load_config(RetrievalConfig, path, ["model.kind=videomamba"] + list(step.overrides))


def _stage2(cfg: VideoTextStageConfig) -> dict:
    from pipeline.stages.video_text import train_video_text

    return train_video_text(cfg, resume="auto")

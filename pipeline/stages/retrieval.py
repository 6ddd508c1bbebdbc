"""Zero-shot text-video retrieval: R@1/5/10, median and mean rank, text->video and video->text.

Encodes every video listed in --annotations (T frames: the middle frame of each of T equal segments, shorter side
resized and centre-cropped, CLIP-normalized; decoded on the CPU) and every text, ranks them by cosine similarity and,
for a model with a video-text matching head, re-ranks each query's top eval.rerank_k by it (UMT's protocol).
A video that is missing or cannot be decoded is counted, listed with the reason in the outputs and left out of the
metrics together with its texts; the command still exits 0.

Datasets (--dataset) and their annotation formats (a JSON list of {"video": "<file>", "caption": ...}, UMT's):
  msrvtt, lsmdc, synthetic   one caption string per video (MSRVTT 1k-A test; `videomamba synth` writes this format)
  msvd                       a list of captions per video, each its own query
  didemo, anet               paragraph retrieval: a video's sentences joined into one text

Main keys (configs/eval_retrieval.yaml; override any as key.sub=value):
  model.kind        open_clip: an image CLIP, frame features mean-pooled over time (CLIP4Clip's zero-shot meanP)
  model.name        the open_clip model name (ViT-B-16, ..., or a custom one such as the demo's tiny-clip, whose
                    <name>.json sits beside the checkpoint)
  data.num_frames   frames per video          data.img_size   frame side in pixels
  eval.batch_size   videos/texts per forward  eval.num_workers   decoding processes (0: in this process)
  eval.rerank_k     candidates re-ranked by a matching head (models without one, like CLIP, skip it)

Writes OUT/retrieval_<dataset>.json (metrics both ways, counts, skipped videos with reasons, the resolved config),
OUT/retrieval_<dataset>.md (the table, also printed) and OUT/retrieval_<dataset>.png (R@1/5/10 bar chart).

Examples:
  videomamba eval --config configs/eval_retrieval.yaml --checkpoint openai --dataset msrvtt \\
      --annotations ann/msrvtt_test1k.json --videos s3://bucket/msrvtt/videos --out results/
  videomamba eval --config configs/eval_retrieval.yaml --checkpoint demo_out/teacher/tiny_clip.pt \\
      --dataset synthetic --annotations demo_out/corpus/eval/msrvtt_test.json --videos demo_out/corpus/eval/videos \\
      model.name=tiny-clip data.img_size=64
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from typing import Optional

import fsspec
import numpy as np
import torch
from tqdm import tqdm

from pipeline.config import ConfigError, RetrievalConfig, load_config, resolved_dict
from pipeline.data.decode import CpuDecoder, DecodeError, EncodedSample, probe
from pipeline.data.transforms import clip_plan
from pipeline.eval.annotations import DATASETS, RetrievalAnnotations, read_annotations
from pipeline.eval.metrics import RECALL_AT, retrieval_metrics
from pipeline.eval.models import VideoTextModel, build_video_text_model
from pipeline.eval.rerank import reranked

DIRECTIONS = {"text_to_video": "text→video", "video_to_text": "video→text"}


class NoUsableVideos(RuntimeError):
    """Not one listed video could be read and decoded."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="FILE", help="the eval YAML config (path or URL)")
    parser.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="the model's weights: for model.kind=open_clip a checkpoint file/URL or a pretrained tag; "
                             "for model.kind=videomamba a stage-2 run folder or one of its checkpoints")
    parser.add_argument("--dataset", required=True, metavar="|".join(DATASETS),
                        help="which annotation format --annotations is in (see above)")
    parser.add_argument("--annotations", required=True, metavar="FILE", help="the test annotations JSON (path or URL)")
    parser.add_argument("--videos", required=True, metavar="DIR|URL", help="the folder the annotations' videos are in")
    parser.add_argument("--out", default="eval_out", metavar="DIR", help="where the results go (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="config overrides, e.g. model.name=tiny-clip data.num_frames=12")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(RetrievalConfig, args.config, args.overrides)
    try:
        result = evaluate_retrieval(cfg, args.checkpoint, args.dataset, args.annotations, args.videos, args.out,
                                    progress=not args.no_progress)
    except NoUsableVideos as e:
        print(f"videomamba eval: {e}", flush=True)
        return 1
    print(result_markdown(result), flush=True)
    print(f"videomamba eval: wrote {result['outputs']['json']}, .md and .png", flush=True)
    return 0


def evaluate_retrieval(cfg: RetrievalConfig, checkpoint: str, dataset: str, annotations: str, videos: str,
                       out: str, progress: bool = True) -> dict:
    """Runs the evaluation, writes OUT/retrieval_<dataset>.json/.md/.png and returns the JSON's content."""
    started = time.time()
    check_retrieval_config(cfg)
    if dataset not in DATASETS:
        raise ConfigError(f"--dataset {dataset!r} is not one of {', '.join(DATASETS)}")
    ann = read_annotations(annotations, dataset)
    fs, path = fsspec.core.url_to_fs(videos)
    if not fs.isdir(path):
        raise ConfigError(f"--videos {videos}: no such folder")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_video_text_model(cfg.model, checkpoint, cfg.data.img_size, device, cfg.data.num_frames)
    result = retrieval_result(model, cfg, ann, videos, progress)
    described = (f"{cfg.model.kind} {cfg.model.name} (frame features mean-pooled, meanP)"
                 if cfg.model.kind == "open_clip" else "videomamba stage-2 video-text model")
    result.update(dataset=dataset, annotations=annotations, videos=videos, checkpoint=checkpoint, model=described,
                  seconds=round(time.time() - started, 1), config=resolved_dict(cfg))
    result["outputs"] = write_outputs(result, out, dataset)
    return result


def check_retrieval_config(cfg: RetrievalConfig) -> None:
    """Raises ConfigError for values no evaluation can use."""
    for key, value, least in (("data.num_frames", cfg.data.num_frames, 1), ("data.img_size", cfg.data.img_size, 1),
                              ("eval.batch_size", cfg.eval.batch_size, 1), ("eval.rerank_k", cfg.eval.rerank_k, 0),
                              ("eval.num_workers", cfg.eval.num_workers, 0)):
        if value < least:
            raise ConfigError(f"{key}={value}: must be at least {least}")


def retrieval_result(model: VideoTextModel, cfg: RetrievalConfig, ann: RetrievalAnnotations, videos: str,
                     progress: bool) -> dict:
    """Returns the metrics, counts, skipped videos and re-ranking outcome of `model` on `ann`."""
    video_features, kept, skipped = encoded_videos(model, ann.videos, videos, cfg, progress)
    if not kept:
        raise NoUsableVideos(f"none of the {len(ann.videos)} videos under {videos} could be used: "
                             f"{skipped[0]['video']}: {skipped[0]['reason']} (and {len(skipped) - 1} more)")
    column = {v: j for j, v in enumerate(kept)}
    texts = [(t, column[v]) for t, v in zip(ann.texts, ann.text_video) if v in column]
    text_features = torch.cat([model.encode_texts([t for t, _ in texts[i:i + cfg.eval.batch_size]])
                               for i in range(0, len(texts), cfg.eval.batch_size)])
    text_video = [v for _, v in texts]
    similarity = (text_features @ video_features.T).float().cpu()
    result = {
        "counts": {"videos": len(ann.videos), "texts": len(ann.texts), "videos_evaluated": len(kept),
                   "texts_evaluated": len(texts), "videos_skipped": len(skipped)},
        "chance_r1": 1.0 / len(kept),
        "metrics": retrieval_metrics(similarity, text_video),
        "skipped": skipped,
    }
    result.update(rerank_outcome(model, similarity, text_video, cfg.eval.rerank_k))
    return result


def rerank_outcome(model: VideoTextModel, similarity: torch.Tensor, text_video: list[int], k: int) -> dict:
    """Returns {"rerank": what was done} and, when the model has a matching head and k > 0, the re-ranked metrics.

    The head's indices count the texts and videos in the order they were encoded (each once, skipped ones never)."""
    match = getattr(model, "match_score", None)
    if match is None or k == 0:
        why = "eval.rerank_k is 0" if k == 0 else "the model has no video-text matching head"
        return {"rerank": {"k": k, "applied": False, "why": why}}
    t2v = reranked(similarity, k, match)
    v2t = reranked(similarity.T, k, lambda q, c: match(c, q))
    t2v_metrics = retrieval_metrics(t2v, text_video)["text_to_video"]
    v2t_metrics = retrieval_metrics(v2t.T, text_video)["video_to_text"]
    return {"rerank": {"k": k, "applied": True},
            "reranked_metrics": {"text_to_video": t2v_metrics, "video_to_text": v2t_metrics}}


# ---------------------------------------------------------------------------------------------------- decoding
@dataclass
class _Decoded:
    index: int
    clip: Optional[torch.Tensor]
    kind: str = ""
    reason: str = ""


class _EvalClips(torch.utils.data.Dataset):
    """The listed videos decoded with the evaluation plan; one that cannot be read comes back with the reason."""

    def __init__(self, root: str, names: list[str], num_frames: int, img_size: int):
        self.root, self.names, self.num_frames, self.img_size = root.rstrip("/"), names, num_frames, img_size
        self.decoder = CpuDecoder(threads=1)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> _Decoded:
        url = f"{self.root}/{self.names[i]}"
        try:
            with fsspec.open(url, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return _Decoded(i, None, "missing", f"no such file: {url}")
        try:
            info = probe(data, "video")
            plan = clip_plan(info.frames, info.fps, info.width, info.height, self.num_frames, self.img_size,
                             train=False, target_fps=None, rng=np.random.default_rng(0))
            return _Decoded(i, self.decoder.decode_one(EncodedSample(self.names[i], "video", data, plan)))
        except DecodeError as e:
            return _Decoded(i, None, e.kind, str(e))


def encoded_videos(model: VideoTextModel, names: list[str], root: str, cfg: RetrievalConfig,
                   progress: bool) -> tuple[torch.Tensor, list[int], list[dict]]:
    """Returns the features (kept, D) of the videos that decoded, their indices into `names`, and the skipped ones
    as {"video", "kind", "reason"}."""
    loader = torch.utils.data.DataLoader(_EvalClips(root, names, cfg.data.num_frames, cfg.data.img_size),
                                         batch_size=cfg.eval.batch_size, num_workers=cfg.eval.num_workers,
                                         collate_fn=list)
    features, kept, skipped = [], [], []
    with tqdm(total=len(names), desc="[eval] encoding videos", unit="video", disable=not progress) as bar:
        for batch in loader:
            good = [d for d in batch if d.clip is not None]
            skipped += [{"video": names[d.index], "kind": d.kind, "reason": d.reason} for d in batch if d.clip is None]
            if good:
                features.append(model.encode_videos(torch.stack([d.clip for d in good])).cpu())
                kept += [d.index for d in good]
            bar.update(len(batch))
    return (torch.cat(features) if features else torch.empty(0)), kept, skipped


# ------------------------------------------------------------------------------------------------------ outputs
def result_markdown(result: dict) -> str:
    """Returns the result as a markdown table with a heading line (what is printed and written to the .md)."""
    c = result["counts"]
    lines = [f"## Zero-shot retrieval: {result['dataset']}", "",
             f"{result['model']}; {c['videos_evaluated']} videos, {c['texts_evaluated']} texts "
             f"({c['videos_skipped']} videos skipped); chance R@1 {result['chance_r1']:.3f}", ""]
    lines += _metrics_table(result["metrics"], "")
    if result["rerank"]["applied"]:
        lines += _metrics_table(result["reranked_metrics"], f" (re-ranked top {result['rerank']['k']})")
    else:
        lines.append(f"\nNo re-ranking: {result['rerank']['why']}.")
    if result["skipped"]:
        lines += ["", "Skipped videos:"] + [f"- {s['video']}: {s['kind']} ({s['reason']})" for s in result["skipped"]]
    return "\n".join(lines)


def _metrics_table(metrics: dict, suffix: str) -> list[str]:
    head = " | ".join(f"R@{k}" for k in RECALL_AT)
    rows = ["| direction | " + head + " | MdR | MnR |", "|---|" + "---:|" * (len(RECALL_AT) + 2)]
    for key, label in DIRECTIONS.items():
        m = metrics[key]
        recalls = " | ".join(f"{m[f'R@{k}']:.3f}" for k in RECALL_AT)
        rows.append(f"| {label}{suffix} | {recalls} | {m['MdR']:g} | {m['MnR']:.1f} |")
    return rows


def write_outputs(result: dict, out: str, dataset: str) -> dict:
    """Writes the .json, .md and .png of `result` under `out` (any fsspec URL); returns their URLs."""
    fs, folder = fsspec.core.url_to_fs(out)
    fs.makedirs(folder, exist_ok=True)
    base = f"{out.rstrip('/')}/retrieval_{dataset}"
    paths = {"json": base + ".json", "md": base + ".md", "png": base + ".png"}
    with fsspec.open(paths["json"], "w") as f:
        json.dump({**result, "outputs": paths}, f, indent=2)
    with fsspec.open(paths["md"], "w") as f:
        f.write(result_markdown(result) + "\n")
    with fsspec.open(paths["png"], "wb") as f:
        recall_chart(result).save(f, format="PNG")
    return paths


def recall_chart(result: dict, width: int = 480, height: int = 260):
    """Returns a PIL bar chart of R@1/5/10 for both directions (0 to 1 on the vertical axis, chance R@1 dashed)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 40, width - 10, 30, height - 40
    draw.text((left, 8), f"zero-shot retrieval: {result['dataset']} ({result['counts']['videos_evaluated']} videos)",
              fill="black")
    draw.line([(left, top), (left, bottom), (right, bottom)], fill="black")
    for tick in (0.0, 0.5, 1.0):
        y = bottom - tick * (bottom - top)
        draw.text((8, y - 6), f"{tick:.1f}", fill="black")
    colours = {"text_to_video": (66, 120, 200), "video_to_text": (230, 140, 50)}
    group = (right - left) / len(RECALL_AT)
    bar = group / 3
    for g, k in enumerate(RECALL_AT):
        for d, key in enumerate(DIRECTIONS):
            value = result["metrics"][key][f"R@{k}"]
            x0 = left + g * group + bar / 2 + d * bar
            draw.rectangle([x0, bottom - value * (bottom - top), x0 + bar - 2, bottom], fill=colours[key])
        draw.text((left + g * group + group / 2 - 10, bottom + 6), f"R@{k}", fill="black")
    chance_y = bottom - result["chance_r1"] * (bottom - top)
    for x in range(left, right, 8):
        draw.line([(x, chance_y), (x + 4, chance_y)], fill="grey")
    draw.text((right - 64, chance_y - 12), "chance R@1", fill="grey")
    for d, (key, label) in enumerate(DIRECTIONS.items()):
        draw.rectangle([left + d * 120, height - 16, left + d * 120 + 10, height - 6], fill=colours[key])
        draw.text((left + d * 120 + 14, height - 18), label.replace("→", "->"), fill="black")
    return image

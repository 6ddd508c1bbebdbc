"""The outputs of a retrieval evaluation: OUT/retrieval_<dataset>.json (the result), .md (the table, also printed),
.png (R@1/5/10 bar chart) and .scores.npz (every score ranked by: `pipeline.eval.scores`), written through fsspec.

Every headline of an evaluation that left videos out says "on N of M videos"."""
from __future__ import annotations

import json

import fsspec

from pipeline.eval.metrics import RECALL_AT
from pipeline.eval.scores import write_scores

DIRECTIONS = {"img": "text→video", "txt": "video→text"}  # UMT's prefixes: img_r* text->video, txt_r* video->text
SCORE_KINDS = {"contrastive": "contrastive", "reranked": "re-ranked"}


def headline(result: dict) -> str:
    """Returns the one line that sums the result up: R@1 both ways of the final scores, and the coverage."""
    kind = "reranked" if "reranked" in result["metrics"] else "contrastive"
    m = result["metrics"][kind]
    coverage = f" {result['coverage']}" if result.get("coverage") else ""
    how = f"re-ranked top {result['rerank']['k']}" if kind == "reranked" else "contrastive"
    return (f"{result['dataset']}: text→video R@1 {m['img_r1']:.1f}, video→text R@1 {m['txt_r1']:.1f}, "
            f"R mean {m['r_mean']:.1f} ({how}){coverage}")


def result_markdown(result: dict) -> str:
    """Returns the result as a markdown table with a heading line (what is printed and written to the .md)."""
    c = result["counts"]
    coverage = f" {result['coverage']}" if result.get("coverage") else ""
    lines = [f"## Zero-shot retrieval: {result['dataset']}{coverage}", "", headline(result), "",
             f"{result['model']}; {c['videos_evaluated']} of {c['videos']} videos, {c['texts_evaluated']} texts "
             f"({c['videos_skipped']} videos skipped); chance R@1 {result['chance_r1']:.2f}%; recalls in %, "
             f"MdR/MnR 1-based (ties counted against the query)", ""]
    head = " | ".join(f"R@{k}" for k in RECALL_AT)
    lines += ["| scores | direction | " + head + " | MdR | MnR |", "|---|---|" + "---:|" * (len(RECALL_AT) + 2)]
    for kind, label in SCORE_KINDS.items():
        if kind not in result["metrics"]:
            continue
        m = result["metrics"][kind]
        for prefix, direction in DIRECTIONS.items():
            short = "t2v" if prefix == "img" else "v2t"
            recalls = " | ".join(f"{m[f'{prefix}_r{k}']:.1f}" for k in RECALL_AT)
            lines.append(f"| {label} | {direction} | {recalls} | {m[f'{short}_MdR']:g} | {m[f'{short}_MnR']:.1f} |")
        lines.append(f"| {label} | r_mean | {m['r_mean']:.2f} | | | | |")
    if not result["rerank"]["applied"]:
        lines.append(f"\nNo re-ranking: {result['rerank']['why']}.")
    if result["skipped"]:
        lines += ["", "Skipped videos:"] + [f"- {s['video']}: {s['kind']} ({s['reason']})" for s in result["skipped"]]
    return "\n".join(lines)


def write_outputs(result: dict, out: str, dataset: str, scores=None) -> dict:
    """Writes the .json, .md, .png of `result` and, given the `RetrievalScores`, .scores.npz under `out` (any fsspec
    URL); returns their URLs."""
    fs, folder = fsspec.core.url_to_fs(out)
    fs.makedirs(folder, exist_ok=True)
    base = f"{out.rstrip('/')}/retrieval_{dataset}"
    paths = {"json": base + ".json", "md": base + ".md", "png": base + ".png"}
    if scores is not None:
        paths["scores"] = base + ".scores.npz"  # per dataset: several evaluations may share OUT
        write_scores(paths["scores"], scores.similarity, scores.text_video, scores.videos, scores.texts, scores.t2v,
                     scores.v2t)
    with fsspec.open(paths["json"], "w") as f:
        json.dump({**result, "outputs": paths}, f, indent=2)
    with fsspec.open(paths["md"], "w") as f:
        f.write(result_markdown(result) + "\n")
    with fsspec.open(paths["png"], "wb") as f:
        recall_chart(result).save(f, format="PNG")
    return paths


def recall_chart(result: dict, width: int = 480, height: int = 260):
    """Returns a PIL bar chart of R@1/5/10 for both directions of the final scores (0 to 100%, chance R@1 dashed)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 40, width - 10, 30, height - 40
    c = result["counts"]
    draw.text((left, 8), f"zero-shot retrieval: {result['dataset']} ({c['videos_evaluated']} of {c['videos']} videos)",
              fill="black")
    metrics = result["metrics"].get("reranked", result["metrics"]["contrastive"])
    draw.line([(left, top), (left, bottom), (right, bottom)], fill="black")
    for tick in (0, 50, 100):
        y = bottom - tick / 100 * (bottom - top)
        draw.text((8, y - 6), f"{tick}", fill="black")
    colours = {"img": (66, 120, 200), "txt": (230, 140, 50)}
    group = (right - left) / len(RECALL_AT)
    bar = group / 3
    for g, k in enumerate(RECALL_AT):
        for d, key in enumerate(DIRECTIONS):
            value = metrics[f"{key}_r{k}"] / 100
            x0 = left + g * group + bar / 2 + d * bar
            draw.rectangle([x0, bottom - value * (bottom - top), x0 + bar - 2, bottom], fill=colours[key])
        draw.text((left + g * group + group / 2 - 10, bottom + 6), f"R@{k}", fill="black")
    chance_y = bottom - result["chance_r1"] / 100 * (bottom - top)
    for x in range(left, right, 8):
        draw.line([(x, chance_y), (x + 4, chance_y)], fill="grey")
    draw.text((right - 64, chance_y - 12), "chance R@1", fill="grey")
    for d, (key, label) in enumerate(DIRECTIONS.items()):
        draw.rectangle([left + d * 120, height - 16, left + d * 120 + 10, height - 6], fill=colours[key])
        draw.text((left + d * 120 + 14, height - 18), label.replace("→", "->"), fill="black")
    return image

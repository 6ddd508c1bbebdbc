"""The outputs of a retrieval evaluation: OUT/retrieval_<dataset>.json (the result), .md (the table, also printed)
and .png (R@1/5/10 bar chart), written through fsspec."""
from __future__ import annotations

import json

import fsspec

from pipeline.eval.metrics import RECALL_AT

DIRECTIONS = {"text_to_video": "text→video", "video_to_text": "video→text"}


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

"""The report of a `videomamba run`: OUT/report.md and OUT/report.html with PNG plots under OUT/plots/ (loss curves
per training step, learning rate, throughput, from each run's metrics.jsonl) and the recall table of every benchmark
beside the paper's figures for the recipe. Everything comes from the steps' markers and outputs, so a rerun whose
steps are all complete writes the same report."""
from __future__ import annotations

import html
import json
import os

PLOT_W, PLOT_H = 640, 300
COLOURS = [(66, 120, 200), (230, 140, 50), (60, 160, 90), (200, 60, 60), (140, 90, 190), (120, 120, 120)]
TRAINING_LOSSES = {"alignment loss": "loss"}  # stage 1's label for its metrics key
VIDEO_TEXT_LOSSES = ("vtc", "vtm", "mlm", "align")


def write_report(out: str, name: str, steps: list[tuple[str, str]], paper: dict[str, float]) -> str:
    """Writes report.md, report.html and plots/*.png for the run's (step name, kind) list; returns the markdown."""
    markers = {n: _marker(out, n) for n, _ in steps}
    rows = [(n, _step_result(out, n, kind, markers[n]), markers[n]["seconds"]) for n, kind in steps]
    table = ["| step | result | seconds |", "|---|---|---:|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    evals = [(n, markers[n]) for n, kind in steps if kind == "eval"]
    recall = recall_table(evals, paper)
    plots = _write_plots(out, [n for n, kind in steps if kind == "train"])
    md = ["\n".join(table)]
    if recall:
        md.append("Zero-shot text-to-video and video-to-text retrieval (R@k in %, UMT's protocol; `scores`: re-ranked "
                  "by the matching head or contrastive; the paper's T2V R@1 for this recipe beside it):\n\n"
                  + "\n".join(recall))
    if plots:
        md.append("Plots: " + ", ".join(f"[{title}]({path})" for title, path in plots))
    text = "\n\n".join(md)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(out, "report.html"), "w") as f:
        f.write(_html(name, [table, recall], plots))
    return text


def recall_table(evals: list[tuple[str, dict]], paper: dict[str, float]) -> list[str]:
    """Markdown rows: per evaluation step and benchmark, R@1/5/10 both ways (in %) and the paper's T2V R@1."""
    rows = []
    for step, results in evals:
        for bench, r in results.items():
            if not isinstance(r, dict) or "t2v" not in r:
                continue
            t2v, v2t = r["t2v"], r["v2t"]
            ref = paper.get(bench) if step == "eval_stage2" else None
            rows.append(f"| {step} | {bench} | {r['videos']} | {r['scores']} | {t2v['R@1']:.1f} | {t2v['R@5']:.1f} | "
                        f"{t2v['R@10']:.1f} | {v2t['R@1']:.1f} | {v2t['R@5']:.1f} | "
                        f"{'-' if ref is None else f'{ref:.1f}'} |")
    if not rows:
        return []
    return ["| step | benchmark | videos | scores | T2V R@1 | T2V R@5 | T2V R@10 | V2T R@1 | V2T R@5 | paper T2V R@1 |",
            "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"] + rows


def _marker(out: str, name: str) -> dict:
    with open(os.path.join(out, "steps", f"{name}.json")) as f:
        return json.load(f)


def _step_result(out: str, name: str, kind: str, m: dict) -> str:
    if kind == "synth":
        return f"{m.get('videos')} videos, {m.get('images')} images, {m.get('eval_videos')} held-out eval videos"
    if kind == "shard":
        return f"{m['samples']} samples in {m['shards']} shards, {m['failed_rows']} failed rows"
    if kind == "teacher":
        with open(os.path.join(out, "teacher", "tiny_clip_metrics.json")) as f:
            t = json.load(f)
        return (f"contrastive loss {t['loss_first10']:.2f} -> {t['loss_last10']:.2f}; image->text top-1 held-out "
                f"{t['held_out']['top1']:.2f} (chance {t['held_out']['chance']:.2f})")
    if kind == "text":
        weights = (f", weights std {m['init_std']:.3f}, dropout {m['dropout']:g}" if "init_std" in m else "")
        return (f"tiny BERT: {m['layers']} layers of {m['hidden']}, a {m['vocab']}-id WordPiece vocabulary from "
                f"{m['captions']} captions{weights}")
    if kind == "train":
        records = _metrics(m["run_dir"])
        video_text = any("vtc" in r for r in records)
        losses = {k: k for k in VIDEO_TEXT_LOSSES} if video_text else TRAINING_LOSSES
        return _training_summary(records, losses, digits=2 if video_text else 3)
    return _eval_summary(m, "CLIP meanP" if name == "eval_teacher" else "VideoMamba stage 2")


def _metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _training_summary(records: list[dict], losses: dict[str, str], digits: int) -> str:
    """For each {label: metrics key} the run logged, the mean over the first and over the last k steps."""
    k = max(1, min(10, len(records) // 4))
    changes = []
    for label, key in losses.items():
        values = [r[key] for r in records if r.get(key) is not None]
        if values:
            changes.append(f"{label} {sum(values[:k]) / k:.{digits}f} -> {sum(values[-k:]) / k:.{digits}f}")
    return f"{len(records)} steps; {', '.join(changes)} (mean of first/last {k})"


def _eval_summary(results: dict, model: str) -> str:
    """R@1/5/10 text->video and R@1 video->text (in %, the final scores) per benchmark, with the number of videos
    and chance level."""
    parts = []
    for bench, r in results.items():
        if not isinstance(r, dict) or "t2v" not in r:
            continue
        t2v, v2t = r["t2v"], r["v2t"]
        contrastive = r.get("contrastive_r1")
        beside = (f" (contrastive T2V R@1 {contrastive['t2v']:.1f}, V2T R@1 {contrastive['v2t']:.1f})"
                  if contrastive else "")
        parts.append(f"T2V R@1 {t2v['R@1']:.1f} / R@5 {t2v['R@5']:.1f} / R@10 {t2v['R@10']:.1f}, V2T R@1 "
                     f"{v2t['R@1']:.1f} ({bench.upper()} format, {r['videos']} videos; chance 1/{r['videos']}"
                     f"{', ' + str(r['texts']) + ' captions' if r['texts'] != r['videos'] else ''}), {r['scores']}"
                     f"{beside}")
    return f"zero-shot ({model}) " + "; ".join(parts) + "; recalls in %"


# --------------------------------------------------------------------------------------------------------- plots
def _write_plots(out: str, train_steps: list[str]) -> list[tuple[str, str]]:
    """Writes the PNGs; returns (title, path relative to OUT) for each."""
    runs = {name: _metrics(os.path.join(out, name)) for name in train_steps
            if os.path.exists(os.path.join(out, name, "metrics.jsonl"))}
    if not runs:
        return []
    os.makedirs(os.path.join(out, "plots"), exist_ok=True)
    made = []
    for name, records in runs.items():
        keys = [k for k in ("loss", *VIDEO_TEXT_LOSSES) if any(r.get(k) is not None for r in records)]
        series = {k: [(r["step"], r[k]) for r in records if r.get(k) is not None] for k in keys}
        made.append((f"{name} losses", _save(out, f"loss_{name}.png", line_chart(f"{name}: losses by step", series))))
    for key, title in (("lr", "learning rate"), ("clips_per_s", "throughput (clips/s)")):
        series = {name: [(r["step"], r[key]) for r in records if r.get(key) is not None]
                  for name, records in runs.items()}
        made.append((title, _save(out, f"{key}.png", line_chart(f"{title} by step, per training step", series))))
    return made


def _save(out: str, file_name: str, image) -> str:
    image.save(os.path.join(out, "plots", file_name), format="PNG")
    return f"plots/{file_name}"


def line_chart(title: str, series: dict[str, list[tuple[float, float]]], width: int = PLOT_W, height: int = PLOT_H):
    """A PIL line chart of named (x, y) series on shared axes, with the y range and a legend."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 70, width - 10, 28, height - 40
    draw.text((left, 8), title, fill="black")
    draw.line([(left, top), (left, bottom), (right, bottom)], fill="black")
    points = [p for values in series.values() for p in values]
    if not points:
        return image
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
    for frac in (0.0, 0.5, 1.0):
        y = bottom - frac * (bottom - top)
        draw.text((4, y - 6), f"{y0 + frac * (y1 - y0):.3g}", fill="black")
    draw.text((left, bottom + 4), f"{x0:g}", fill="black")
    draw.text((right - 40, bottom + 4), f"{x1:g}", fill="black")

    def at(x: float, y: float) -> tuple[float, float]:
        return left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top)

    for i, (label, values) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        if len(values) > 1:
            draw.line([at(x, y) for x, y in values], fill=colour, width=2)
        elif values:
            cx, cy = at(*values[0])
            draw.ellipse([cx - 2, cy - 2, cx + 2, cy + 2], fill=colour)
        draw.rectangle([left + i * 100, height - 16, left + i * 100 + 10, height - 6], fill=colour)
        draw.text((left + i * 100 + 14, height - 18), label, fill="black")
    return image


def _html(name: str, tables: list[list[str]], plots: list[tuple[str, str]]) -> str:
    """One self-contained page (the PNGs beside it under plots/) with the markdown tables as HTML tables."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>videomamba run {html.escape(name)}</title>"
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}</style></head><body>",
             f"<h1>videomamba run: {html.escape(name or 'report')}</h1>"]
    for rows in tables:
        if rows:
            parts.append(_html_table(rows))
    for title, path in plots:
        parts.append(f"<h3>{html.escape(title)}</h3><img src='{html.escape(path)}' alt='{html.escape(title)}'>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _html_table(rows: list[str]) -> str:
    def cells(row: str) -> list[str]:
        return [html.escape(c.strip()) for c in row.strip().strip("|").split("|")]

    head, body = cells(rows[0]), [cells(r) for r in rows[2:]]
    out = ["<table><tr>" + "".join(f"<th>{c}</th>" for c in head) + "</tr>"]
    out += ["<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in body]
    return "\n".join(out) + "</table>"


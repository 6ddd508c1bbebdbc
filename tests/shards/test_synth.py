"""The synthetic corpus: files decode at the stated size and length, captions say what the pixels show, the same
seed gives the same corpus, eval combinations never occur in training, and the annotations have the benchmark formats.
"""
import hashlib
import json
import re
from pathlib import Path

import av
import fsspec
import numpy as np
import pytest
from PIL import Image

from pipeline.cli import main
from shards.synth import (BACKGROUNDS, COLORS, HELD_OUT_PAIRS, SHAPES, image_combinations, video_combinations,
                          write_corpus)

COUNT_WORDS = {"a": 1, "one": 1, "two": 2, "three": 3}
DIRECTION_WORDS = {"left": "left", "right": "right", "up": "up", "upward": "up", "down": "down", "downward": "down"}
SPEED_WORDS = {"slowly": "slow", "slow": "slow", "quickly": "fast", "fast": "fast"}
SUBJECT = re.compile(r"\b(a|one|two|three) (?:(slow|fast) )?(%s) (%s)s?\b" % ("|".join(COLORS), "|".join(SHAPES)))


# ------------------------------------------------------------------------------------------------------- helpers
def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def decoded(path: Path) -> np.ndarray:
    """Returns the (T, H, W, 3) uint8 RGB frames of the video at `path`, decoded with PyAV."""
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def words_in(caption: str, vocabulary: dict) -> set:
    return {vocabulary[w] for w in re.findall(r"[a-z]+", caption) if w in vocabulary}


def parsed_caption(caption: str, motion: bool = True) -> dict:
    """Returns the attributes a caption states, failing when it states none or two values of one attribute."""
    subjects = SUBJECT.findall(caption)
    assert len(subjects) == 1, f"no single 'count colour shape' phrase in {caption!r}"
    count, _speed, color, shape = subjects[0]
    backgrounds = words_in(caption, {b: b for b in BACKGROUNDS})
    assert len(backgrounds) == 1, caption
    out = {"shape": shape, "color": color, "count": COUNT_WORDS[count], "background": backgrounds.pop()}
    directions, speeds = words_in(caption, DIRECTION_WORDS), words_in(caption, SPEED_WORDS)
    if motion:
        assert len(directions) == 1 and len(speeds) == 1, caption
        out.update(direction=directions.pop(), speed=speeds.pop())
    else:
        assert not directions and not speeds, f"a still image's caption mentions motion: {caption!r}"
    return out


def foreground(frame: np.ndarray, background: str) -> np.ndarray:
    """Returns the mask of pixels clearly unlike the background colour."""
    distance = np.abs(frame.astype(int) - np.array(BACKGROUNDS[background])).sum(-1)
    return distance > 90


def dominant_color(frame: np.ndarray, mask: np.ndarray) -> str:
    """Returns the palette colour nearest to most of the masked pixels."""
    names = list(COLORS)
    palette = np.array([COLORS[n] for n in names])
    nearest = np.abs(frame[mask].astype(int)[:, None] - palette[None]).sum(-1).argmin(1)
    return names[np.bincount(nearest, minlength=len(names)).argmax()]


def runs(profile: np.ndarray) -> int:
    """Returns the number of separate stretches of True in a 1-D boolean profile, bridging 1-pixel gaps (chroma
    subsampling can cut a thin tip off a shape; the generator keeps shapes 3+ pixels apart)."""
    bridged = profile.copy()
    bridged[1:-1] |= profile[:-2] & profile[2:]
    return int(np.count_nonzero(bridged[1:] & ~bridged[:-1]) + bridged[0])


def shape_of(mask: np.ndarray) -> str:
    """Returns the shape a blob of pixels looks like: a triangle is heavier below; of the others a square fills its
    bounding box, a circle ~0.79 of it, a diamond half (reliable from ~12 px radius; chroma is at half resolution)."""
    ys, xs = np.nonzero(mask)
    box = mask[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]
    half = box.shape[0] // 2
    if box[-half:].sum() > 1.4 * box[:half].sum():
        return "triangle"
    fill = box.mean()
    return "square" if fill > 0.87 else "circle" if fill > 0.65 else "diamond"


def largest_blob(mask: np.ndarray, axis_across: int) -> np.ndarray:
    """Returns the mask restricted to its fullest lane (a stretch of the profile across the motion)."""
    profile = mask.sum(axis=1 - axis_across)  # along image axis `axis_across` (0 = rows/y, 1 = columns/x)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], profile > 0, [0]]).astype(int)))
    start, stop = max(zip(edges[::2], edges[1::2]), key=lambda se: profile[se[0]:se[1]].sum())
    lane = np.zeros_like(mask)
    if axis_across == 0:
        lane[start:stop] = mask[start:stop]
    else:
        lane[:, start:stop] = mask[:, start:stop]
    return lane


def seen_attributes(frames: np.ndarray, background: str) -> dict:
    """Returns what the first and last decoded frames show: colour, count, shape, direction, distance moved."""
    first, last = foreground(frames[0], background), foreground(frames[-1], background)
    (y0, x0), (y1, x1) = np.argwhere(first).mean(0), np.argwhere(last).mean(0)
    dx, dy = x1 - x0, y1 - y0
    horizontal = abs(dx) > abs(dy)
    direction = ("right" if dx > 0 else "left") if horizontal else ("down" if dy > 0 else "up")
    across = 0 if horizontal else 1  # lanes are stacked along y for horizontal motion
    return {"color": dominant_color(frames[0], first), "count": runs(first.any(axis=1 if across == 0 else 0)),
            "shape": shape_of(largest_blob(first, across)), "direction": direction, "moved": max(abs(dx), abs(dy))}


# --------------------------------------------------------------------------------------------------------- tests
def settings_of(corpus: Path) -> dict:
    """Returns what the corpus says it was written with (its corpus.json)."""
    return json.loads((corpus / "corpus.json").read_text())


def test_every_file_decodes_at_the_stated_length_and_size(synth_corpus):
    settings = settings_of(synth_corpus)
    videos = read_jsonl(synth_corpus / "videos.jsonl") + read_jsonl(synth_corpus / "eval" / "videos.jsonl")
    assert len(videos) == settings["videos"] + settings["eval_videos"]
    size, frames = settings["size"], settings["frames"]
    for r in videos:
        clip = decoded(synth_corpus / r["path"])
        assert clip.shape == (frames, size, size, 3), r["path"]
        assert (r["width"], r["height"], r["fps"]) == (size, size, settings["fps"])
        assert r["duration"] == pytest.approx(frames / settings["fps"])
        with av.open(str(synth_corpus / r["path"])) as container:
            stream = container.streams.video[0]
            assert (stream.codec_context.name, stream.format.name) == ("h264", "yuv420p")
    images = read_jsonl(synth_corpus / "images.jsonl")
    assert len(images) == settings["images"]
    for r in images:
        with Image.open(synth_corpus / r["path"]) as im:
            assert (im.format, im.size) == ("JPEG", (size, size))


def test_captions_state_the_recorded_attributes(synth_corpus):
    for r in read_jsonl(synth_corpus / "videos.jsonl") + read_jsonl(synth_corpus / "eval" / "videos.jsonl"):
        assert len(r["captions"]) == 5 and len(set(r["captions"])) == 5, r["key"]
        for caption in r["captions"]:
            assert parsed_caption(caption) == r["attributes"], caption
    for r in read_jsonl(synth_corpus / "images.jsonl"):
        for caption in r["captions"]:
            assert parsed_caption(caption, motion=False) == r["attributes"], caption


def test_pixels_show_what_the_captions_say(synth_corpus):
    """The decoded clip's colour, count and direction are the ones its first caption names; fast moves farther."""
    moved = {"slow": [], "fast": []}
    for r in read_jsonl(synth_corpus / "videos.jsonl") + read_jsonl(synth_corpus / "eval" / "videos.jsonl"):
        said = parsed_caption(r["captions"][0])
        seen = seen_attributes(decoded(synth_corpus / r["path"]), said["background"])
        assert {k: seen[k] for k in ("color", "count", "direction")} == \
            {k: said[k] for k in ("color", "count", "direction")}, (r["key"], r["captions"][0])
        moved[said["speed"]].append(seen["moved"] / r["width"])
    assert moved["slow"] and moved["fast"], "the session corpus should hold both speeds"
    assert max(moved["slow"]) < 0.3 < 0.4 < min(moved["fast"])


def test_shapes_are_drawn_as_captioned(tmp_path):
    """At 128 px (shapes of 13+ px radius) the decoded first frame shows the shape the caption names."""
    write_corpus(str(tmp_path), videos=16, images=0, seed=5, size=128, frames=2, eval_videos=4, workers=1,
                 progress=False)
    records = read_jsonl(tmp_path / "videos.jsonl") + read_jsonl(tmp_path / "eval" / "videos.jsonl")
    assert {r["attributes"]["shape"] for r in records} == set(SHAPES)
    for r in records:
        said = parsed_caption(r["captions"][0])
        assert seen_attributes(decoded(tmp_path / r["path"]), said["background"])["shape"] == said["shape"], \
            (r["key"], r["captions"][0])


def test_images_show_their_colour_and_count(synth_corpus):
    for r in read_jsonl(synth_corpus / "images.jsonl"):
        with Image.open(synth_corpus / r["path"]) as im:
            pixels = np.asarray(im.convert("RGB"))
        said = parsed_caption(r["captions"][0], motion=False)
        mask = foreground(pixels, said["background"])
        assert dominant_color(pixels, mask) == said["color"], r["key"]
        assert runs(mask.any(axis=0)) == said["count"] or runs(mask.any(axis=1)) == said["count"], r["key"]


def test_eval_combinations_never_occur_in_training(synth_corpus):
    held_out = set(HELD_OUT_PAIRS)
    pair = lambda r: (r["attributes"]["color"], r["attributes"]["shape"])  # noqa: E731
    train = read_jsonl(synth_corpus / "videos.jsonl") + read_jsonl(synth_corpus / "images.jsonl")
    evals = read_jsonl(synth_corpus / "eval" / "videos.jsonl")
    assert {pair(r) for r in evals} <= held_out
    assert not {pair(r) for r in train} & held_out
    assert not {r["key"] for r in train} & {r["key"] for r in evals}
    # the plan itself: the two splits partition all combinations, and training still sees every word
    train_combos, eval_combos = video_combinations(False), video_combinations(True)
    assert not set(train_combos) & set(eval_combos)
    assert len(train_combos) + len(eval_combos) == len(SHAPES) * len(COLORS) * 3 * len(BACKGROUNDS) * 4 * 2
    assert {a.color for a in train_combos} == set(COLORS) and {a.shape for a in train_combos} == set(SHAPES)
    assert not {(a.color, a.shape) for a in image_combinations()} & held_out


def test_eval_annotations_have_the_benchmark_formats(synth_corpus):
    settings = settings_of(synth_corpus)
    msrvtt = json.loads((synth_corpus / "eval" / "msrvtt_test.json").read_text())
    msvd = json.loads((synth_corpus / "eval" / "msvd_test.json").read_text())
    records = read_jsonl(synth_corpus / "eval" / "videos.jsonl")
    assert len(msrvtt) == len(msvd) == len(records) == settings["eval_videos"]
    for one, many, r in zip(msrvtt, msvd, records):
        assert set(one) == set(many) == {"video", "caption"}
        assert one["video"] == many["video"] and (synth_corpus / "eval" / "videos" / one["video"]).is_file()
        assert isinstance(one["caption"], str) and one["caption"] in many["caption"]
        assert len(many["caption"]) >= 2 and all(isinstance(c, str) for c in many["caption"])
        assert parsed_caption(one["caption"]) == r["attributes"]
    # distinct attribute combinations: each caption is true of exactly one eval video, so retrieval is well posed
    assert len({json.dumps(r["attributes"], sort_keys=True) for r in records}) == len(records)


def corpus_files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_corpus_any_workers_other_seed_differs(tmp_path):
    small = dict(videos=4, images=2, eval_videos=2, size=32, frames=6, progress=False)
    write_corpus(str(tmp_path / "a"), seed=3, workers=1, **small)
    write_corpus(str(tmp_path / "b"), seed=3, workers=2, **small)
    write_corpus(str(tmp_path / "c"), seed=4, workers=1, **small)
    a, b = corpus_files(tmp_path / "a"), corpus_files(tmp_path / "b")
    assert a == b  # every file byte-identical, including the mp4s
    for r in read_jsonl(tmp_path / "a" / "videos.jsonl"):
        assert np.array_equal(decoded(tmp_path / "a" / r["path"]), decoded(tmp_path / "b" / r["path"]))
    assert (tmp_path / "a" / "videos.jsonl").read_bytes() != (tmp_path / "c" / "videos.jsonl").read_bytes()
    assert not np.array_equal(decoded(tmp_path / "a" / "videos" / "synth_000000.mp4"),
                              decoded(tmp_path / "c" / "videos" / "synth_000000.mp4"))


def test_cli_writes_a_vp9_corpus(tmp_path, capsys):
    out = tmp_path / "corpus"
    argv = ["synth", "--out", str(out), "--videos", "3", "--images", "1", "--seed", "1", "--codec", "vp9",
            "--size", "32", "--frames", "6", "--eval-videos", "2", "--workers", "1", "--quiet"]
    assert main(argv) == 0
    assert "3 videos + 2 held-out eval videos" in capsys.readouterr().out
    records = read_jsonl(out / "videos.jsonl")
    assert [r["key"] for r in records] == ["synth_000000", "synth_000001", "synth_000002"]
    with av.open(str(out / records[0]["path"])) as container:
        assert container.streams.video[0].codec_context.name == "vp9"
    assert decoded(out / records[0]["path"]).shape == (6, 32, 32, 3)
    assert json.loads((out / "corpus.json").read_text())["codec"] == "vp9"


@pytest.mark.parametrize("option, value", [("--size", "63"), ("--frames", "1"), ("--videos", "0")])
def test_cli_rejects_a_bad_option_naming_it(tmp_path, capsys, option, value):
    argv = ["synth", "--out", str(tmp_path / "x"), "--images", "0", "--quiet", option, value]
    assert main(argv) == 2
    assert option in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_writes_through_fsspec(tmp_path):
    fs = fsspec.filesystem("memory")
    try:
        write_corpus("memory://synth-test", videos=2, images=1, seed=0, size=32, frames=4, eval_videos=1,
                     workers=1, progress=False)
        record = json.loads(fs.cat("/synth-test/videos.jsonl").decode().splitlines()[1])
        (tmp_path / "v.mp4").write_bytes(fs.cat(f"/synth-test/{record['path']}"))
        assert decoded(tmp_path / "v.mp4").shape == (4, 32, 32, 3)
        assert json.loads(fs.cat("/synth-test/eval/msvd_test.json"))[0]["video"] == "eval_000000.mp4"
    finally:
        fs.rm("/synth-test", recursive=True)


@pytest.mark.parametrize("codec", ["h264", "vp9"])
def test_make_mp4_fixture_frames_are_in_order(make_mp4, tmp_path, codec):
    path = make_mp4(tmp_path / "sub" / "clip.mp4", frames=6, size=(48, 32), codec=codec)
    clip = decoded(path)
    assert clip.shape == (6, 32, 48, 3)
    levels = [int(np.median(frame[:4, :4])) for frame in clip]  # a corner the moving square never reaches
    assert levels == pytest.approx([30 + 180 * i / 5 for i in range(6)], abs=6)  # the level conftest documents

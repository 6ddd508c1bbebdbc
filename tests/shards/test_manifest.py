"""Manifest readers: formats, column aliases, path resolution, bad rows, command-line errors."""
from __future__ import annotations

import json

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import ConfigError
from shards.manifest import read_manifest, resolve


def test_jsonl_rows_resolve_paths_and_keep_metadata(tmp_path):
    rows = [{"key": "a", "path": "videos/a.mp4", "captions": ["one", " ", "two"], "fps": 8,
             "attributes": {"shape": "circle"}},
            {"key": "b", "path": "/abs/b.mp4", "captions": "just one"}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    m = read_manifest(str(tmp_path / "m.jsonl"))
    assert (m.format, m.media_column, m.caption_columns) == ("jsonl", "path", ["captions"])
    a, b = m.rows
    assert a.media == str(tmp_path / "videos" / "a.mp4") and b.media == "/abs/b.mp4"
    assert a.captions == ("one", "two") and b.captions == ("just one",)
    assert a.meta == {"key": "a", "path": "videos/a.mp4", "fps": 8, "attributes": {"shape": "circle"}}
    assert [r.row for r in m.rows] == [0, 1] and a.error is None


def test_csv_aliases_times_and_several_caption_columns(tmp_path):
    (tmp_path / "m.csv").write_text("videoLoc,name,alt,start_time,end\n"
                                    "clips/x.webm,a dog,a brown dog,00:00:01.5,4\n"
                                    "clips/y.webm,a cat,,,\n"
                                    "clips/z.webm,a cow,,soon,\n")
    m = read_manifest(str(tmp_path / "m.csv"), caption_columns=["name", "alt"])
    x, y, z = m.rows
    assert x.media.endswith("/clips/x.webm") and x.captions == ("a dog", "a brown dog")
    assert (x.start, x.end) == (1.5, 4.0) and (y.start, y.end) == (None, None)
    assert y.captions == ("a cat",)
    assert z.error[0] == "bad_time" and "soon" in z.error[1]
    assert [r.key for r in m.rows] == ["000000000", "000000001", "000000002"]


def test_parquet_with_list_captions(tmp_path):
    table = pa.table({"video": ["a.mp4", "b.mp4"], "caption": [["x", "y"], ["z"]], "score": [0.5, 0.25]})
    pq.write_table(table, tmp_path / "m.parquet")
    m = read_manifest(str(tmp_path / "m.parquet"))
    assert m.media_column == "video" and [r.captions for r in m.rows] == [("x", "y"), ("z",)]
    assert m.rows[1].meta == {"video": "b.mp4", "score": 0.25}


def test_bad_rows_stay_rows_with_a_reason(tmp_path):
    lines = ['{"path": "a.mp4", "caption": "ok"}', "{oops", "[1, 2]", '{"path": "", "caption": "x"}']
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    m = read_manifest(str(tmp_path / "m.jsonl"))
    assert [r.error[0] if r.error else None for r in m.rows] == [None, "bad_manifest_row", "bad_manifest_row",
                                                                 "missing_media_field"]


def test_keys_are_webdataset_safe_and_unique(tmp_path):
    rows = [{"key": "clip.v1/a", "path": "a.mp4", "caption": "x"},
            {"key": "clip.v1/a", "path": "b.mp4", "caption": "y"}, {"path": "c.mp4", "caption": "z"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    keys = [r.key for r in read_manifest(str(tmp_path / "m.jsonl")).rows]
    assert keys == ["clip_v1_a", "clip_v1_a-r1", "000000002"]
    assert all("." not in k and "/" not in k for k in keys)


def test_folder_of_media_with_sidecars(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.mp4").write_bytes(b"x")
    (tmp_path / "sub" / "b.txt").write_text("first caption\n\nsecond caption\n")
    (tmp_path / "a.jpg").write_bytes(b"x")
    (tmp_path / "a.json").write_text(json.dumps({"caption": "from json", "source": "cam"}))
    (tmp_path / "c.mp4").write_bytes(b"x")  # no sidecar: no caption, fails later as empty_caption
    (tmp_path / "notes.md").write_text("not media")
    m = read_manifest(str(tmp_path))
    assert m.format == "folder" and [r.key for r in m.rows] == ["a", "c", "sub_b"]
    a, c, b = m.rows
    assert a.captions == ("from json",) and a.meta == {"path": "a.jpg", "source": "cam"}
    assert b.captions == ("first caption", "second caption") and b.media.endswith("sub/b.mp4")
    assert c.captions == ()


def test_memory_url_manifest_resolves_against_its_folder():
    fs = fsspec.filesystem("memory")
    fs.pipe("/corpus_m/m.csv", b"path,text\nv/a.mp4,hello\n")
    m = read_manifest("memory://corpus_m/m.csv")
    assert m.rows[0].media == "memory://corpus_m/v/a.mp4"
    fs.rm("/corpus_m", recursive=True)


def test_resolve_keeps_urls_and_absolute_paths():
    assert resolve("s3://bucket/dir/m.csv", "../v/a.mp4") == "s3://bucket/v/a.mp4"
    assert resolve("s3://bucket/dir/m.csv", "https://host/a.mp4") == "https://host/a.mp4"
    assert resolve("/data/m.csv", "/elsewhere/a.mp4") == "/elsewhere/a.mp4"


def test_missing_manifest_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="manifest not found: .*nope.jsonl"):
        read_manifest(str(tmp_path / "nope.jsonl"))


def test_manifest_without_media_column_names_file_and_columns(tmp_path):
    (tmp_path / "m.csv").write_text("clip,caption\na.mp4,x\n")
    with pytest.raises(ConfigError) as e:
        read_manifest(str(tmp_path / "m.csv"))
    assert "m.csv" in str(e.value) and "no media column" in str(e.value) and "clip, caption" in str(e.value)
    assert read_manifest(str(tmp_path / "m.csv"), media_column="clip").rows[0].media.endswith("/a.mp4")
    with pytest.raises(ConfigError, match="--caption-column 'label' is not a column; its columns are: clip, caption"):
        read_manifest(str(tmp_path / "m.csv"), media_column="clip", caption_columns=["label"])


def test_unknown_manifest_format_is_a_config_error(tmp_path):
    (tmp_path / "m.xlsx").write_text("x")
    with pytest.raises(ConfigError, match="m.xlsx: unknown manifest format"):
        read_manifest(str(tmp_path / "m.xlsx"))


@pytest.mark.parametrize("raw_keys, want", [
    (["a", "a-r2", "a"], ["a", "a-r2", "a-r2-2"]),  # the renamed third `a` would have been row 1's key
    (["a", "a", "a-r1"], ["a", "a-r1", "a-r1-r2"]),  # a row's own key taken by an earlier rename
    (["a.b", "a/b", "a_b", "a_b-r1", "a_b-r2"], ["a_b", "a_b-r1", "a_b-r2", "a_b-r1-r3", "a_b-r2-r4"]),
])
def test_a_renamed_key_is_free_so_no_two_rows_share_one(tmp_path, raw_keys, want):
    rows = [{"key": k, "path": f"{i}.mp4", "caption": "x"} for i, k in enumerate(raw_keys)]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    keys = [r.key for r in read_manifest(str(tmp_path / "m.jsonl")).rows]
    assert keys == want and len(set(keys)) == len(keys)


def test_folder_stems_that_collide_after_cleaning_get_free_keys(tmp_path):
    for name in ("a_b.mp4", "a.b.mp4", "a/b.mp4", "a_b-r1.mp4"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    keys = [r.key for r in read_manifest(str(tmp_path)).rows]
    assert len(set(keys)) == len(keys) == 4


BAD = b"caf\xe9"  # Latin-1, not UTF-8


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "json", "csv.gz"])
def test_a_byte_that_is_not_utf8_fails_its_row_only(tmp_path, fmt):
    import gzip

    good = [("a.mp4", b"a dog runs"), ("b.mp4", b"a " + BAD + b" at night"), ("c.mp4", b"the sea")]
    if fmt.startswith("csv"):
        data = b"path,caption\n" + b"".join(p.encode() + b"," + c + b"\n" for p, c in good)
    elif fmt == "jsonl":
        data = b"".join(b'{"path": "' + p.encode() + b'", "caption": "' + c + b'"}\n' for p, c in good)
    else:
        data = b"[" + b",".join(b'{"path": "' + p.encode() + b'", "caption": "' + c + b'"}' for p, c in good) + b"]"
    path = tmp_path / f"m.{fmt}"
    path.write_bytes(gzip.compress(data) if fmt.endswith(".gz") else data)
    rows = read_manifest(str(path)).rows
    assert [r.error[0] if r.error else None for r in rows] == [None, "not_utf8", None]
    assert "byte 0xe9" in rows[1].error[1] and "caption" in rows[1].error[1]
    assert rows[0].captions == ("a dog runs",) and rows[2].captions == ("the sea",)


def test_a_folder_caption_that_is_not_utf8_fails_its_row_not_silently_replaced(tmp_path):
    for stem, caption in (("a", b"fine"), ("b", BAD), ("c", b"also fine")):
        (tmp_path / f"{stem}.mp4").write_bytes(b"x")
        (tmp_path / f"{stem}.txt").write_bytes(caption + b"\n")
    rows = read_manifest(str(tmp_path)).rows
    assert [r.error[0] if r.error else None for r in rows] == [None, "not_utf8", None]
    assert "b.txt" in rows[1].error[1] and "0xe9" in rows[1].error[1]


def test_planning_refuses_rows_that_share_a_key():
    from shards.index import plan_shards
    from shards.manifest import ManifestRow
    from shards.media import ProcessOptions

    rows = [ManifestRow(0, "a", "a.mp4", ("x",)), ManifestRow(1, "b", "b.mp4", ("y",)), ManifestRow(2, "a", "c.mp4")]
    with pytest.raises(ValueError, match="manifest rows 0 and 2 share the key 'a'"):
        plan_shards(rows, 2, "shard", ProcessOptions())

"""The shard task body without Ray: reproducible tars, failures, publishing, and what counts as a complete shard."""
from __future__ import annotations

import hashlib
import json
import os

import fsspec
import webdataset as wds

from shards.index import completed_shards, plan_shards, remove_stale_temporaries
from shards.manifest import read_manifest
from shards.media import ProcessOptions, RetryPolicy
from shards.writer import ShardOptions, publish_from_driver, write_shard
from tests.shards.conftest import MIXED_ROWS, expected_failures

FAST = RetryPolicy(attempts=2, backoff_s=0.01)


def plans_of(manifest, n=4, process=ProcessOptions()):
    return plan_shards(read_manifest(str(manifest)).rows, n, "shard", process)


def test_shard_holds_the_good_rows_and_records_the_bad(mixed_corpus, tmp_path):
    plans = plans_of(mixed_corpus)
    out = tmp_path / "out"
    out.mkdir()
    results = [write_shard(p, ShardOptions(str(out), FAST)) for p in plans]
    assert [r.entry["rows"] for r in results] == [[0, 4], [4, 8], [8, 12]]
    failed = {f["row"]: f["reason"] for r in results for f in r.failures}
    assert failed == expected_failures()
    good = [key for i, (key, _, _, reason) in enumerate(MIXED_ROWS) if not reason]
    samples = list(wds.WebDataset(str(out / "shard-{000000..000002}.tar"), shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in samples] == good
    for s in samples:
        meta = json.loads(s["json"])
        assert s["txt"].decode() == meta["captions"][0] and meta["key"] == s["__key__"] and meta["source"] == "test"
        assert ("mp4" in s) == (meta["media_info"]["kind"] == "video") and ("jpg" in s) != ("mp4" in s)
    for r in results:
        tar = (out / r.entry["url"]).read_bytes()
        assert r.entry["bytes"] == len(tar) and r.entry["sha256"] == hashlib.sha256(tar).hexdigest()
        assert json.loads((out / r.entry["url"].replace(".tar", ".json")).read_text())["entry"] == r.entry
    assert not [f for f in os.listdir(out) if ".tmp-" in f]


def test_shard_bytes_are_reproducible(mixed_corpus, tmp_path):
    process = ProcessOptions(short_side=16, fps=4)
    plan = plans_of(mixed_corpus, n=12, process=process)[0]
    digests = set()
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        digests.add(write_shard(plan, ShardOptions(str(tmp_path / run), FAST, process)).entry["sha256"])
    assert len(digests) == 1


def test_memory_output_comes_back_to_the_driver(mixed_corpus):
    plan = plans_of(mixed_corpus)[0]
    result = write_shard(plan, ShardOptions("memory://writer_test/out", FAST))
    fs = fsspec.filesystem("memory")
    assert result.tar is not None and not fs.exists("/writer_test/out/shard-000000.tar")
    publish_from_driver(result, plan, "memory://writer_test/out")
    assert hashlib.sha256(fs.cat_file("/writer_test/out/shard-000000.tar")).hexdigest() == result.entry["sha256"]
    assert set(completed_shards("memory://writer_test/out", [plan])) == {0}
    fs.rm("/writer_test", recursive=True)


def test_complete_means_tar_and_matching_sidecar(mixed_corpus, tmp_path):
    plans = plans_of(mixed_corpus)
    out = tmp_path / "out"
    out.mkdir()
    for p in plans:
        write_shard(p, ShardOptions(str(out), FAST))
    assert set(completed_shards(str(out), plans)) == {0, 1, 2}
    (out / "shard-000000.json").write_text('{"entry": {"url": "shard-0')  # a sidecar cut short by a kill
    (out / "shard-000001.tar").write_bytes((out / "shard-000001.tar").read_bytes()[:512])  # wrong size
    (out / ".shard-000002.tar.tmp-abc").write_bytes(b"partial")
    assert set(completed_shards(str(out), plans)) == {2}
    other_options = plans_of(mixed_corpus, process=ProcessOptions(fps=4))
    assert completed_shards(str(out), other_options) == {}  # different processing: nothing reusable
    assert remove_stale_temporaries(str(out)) == 1 and not (out / ".shard-000002.tar.tmp-abc").exists()

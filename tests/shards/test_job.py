"""The sharding job on a real local Ray cluster (2 CPUs, shared by this module): local, memory:// and s3:// URLs
(a moto S3 server started here, reached through the real s3fs client), reruns, processing, the synthetic corpus."""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile

import fsspec
import pytest
import webdataset as wds

from shards.media import ProcessOptions, RetryPolicy
from shards.runner import ShardJobConfig, shard_corpus
from tests.shards.conftest import MIXED_ROWS, closed_port, expected_failures, write_jpg

FAST = RetryPolicy(attempts=2, backoff_s=0.01)
GOOD_KEYS = [key for key, _, _, reason in MIXED_ROWS if not reason]


@pytest.fixture(scope="module")
def s3_endpoint():
    """A local S3-compatible server (moto), configured through the standard AWS variables so that the Ray workers
    started after it find it too."""
    from moto.server import ThreadedMotoServer

    port = closed_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
                            "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            mp.setenv(name, value)
        fsspec.filesystem("s3", skip_instance_cache=True).mkdir("corpus-bucket")
        yield
        fsspec.filesystem("s3").clear_instance_cache()
    server.stop()


@pytest.fixture(scope="module")
def ray_cluster(s3_endpoint):
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    yield
    ray.shutdown()


def job(manifest, out, **kw) -> ShardJobConfig:
    kw.setdefault("progress", False)
    return ShardJobConfig(input=str(manifest), out=str(out), samples_per_shard=kw.pop("n", 4), retry=FAST, **kw)


def read_text(url: str) -> str:
    with fsspec.open(url, "r") as f:
        return f.read()


def test_mixed_corpus_is_sharded_and_bad_rows_recorded(ray_cluster, mixed_corpus, tmp_path):
    out = tmp_path / "out"
    outcome = shard_corpus(job(mixed_corpus, out))
    s = outcome.summary
    assert outcome.ok and s["rows"] == 12 and s["samples"] == len(GOOD_KEYS) == 6
    assert (s["shards"], s["shards_written"], s["shards_skipped"]) == (3, 3, 0)
    assert s["failures_by_reason"] == {r: 1 for r in expected_failures().values()}
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert {f["row"]: f["reason"] for f in failures} == expected_failures()
    assert all(f["detail"] and f["shard"] == f"shard-{f['row'] // 4:06d}.tar" for f in failures)
    index = json.loads((out / "index.json").read_text())
    assert index == outcome.index and index["media"] is None  # videos and images mixed
    assert [e["rows"] for e in index["shards"]] == [[0, 4], [4, 8], [8, 12]]
    assert [e["samples"] for e in index["shards"]] == [3, 1, 2]
    for e in index["shards"]:
        assert hashlib.sha256((out / e["url"]).read_bytes()).hexdigest() == e["sha256"]
    assert json.loads((out / "summary.json").read_text()) == s
    samples = list(wds.WebDataset([str(out / e["url"]) for e in index["shards"]], shardshuffle=False))
    assert [x["__key__"] for x in samples] == GOOD_KEYS


def test_rerun_reuses_complete_shards_and_redoes_damaged_ones(ray_cluster, mixed_corpus, tmp_path):
    out = tmp_path / "out"
    first = shard_corpus(job(mixed_corpus, out))
    again = shard_corpus(job(mixed_corpus, out))
    assert again.summary["shards_skipped"] == 3 and again.summary["shards_written"] == 0
    assert again.index == first.index and again.failures == first.failures
    (out / "shard-000001.tar").unlink()  # killed before the rename ...
    (out / ".shard-000001.tar.tmp-1234").write_bytes(b"half a tar")  # ... with its temporary left behind
    (out / "shard-000002.json").write_text('{"entry": ')  # killed while writing the sidecar
    repaired = shard_corpus(job(mixed_corpus, out))
    assert (repaired.summary["shards_skipped"], repaired.summary["shards_written"]) == (1, 2)
    assert repaired.index == first.index and repaired.failures == first.failures
    assert not [f for f in os.listdir(out) if ".tmp-" in f]


def test_a_shard_that_cannot_be_written_fails_alone_and_a_rerun_retries_it(ray_cluster, mixed_corpus, tmp_path):
    out = tmp_path / "out"
    (out / "shard-000001.tar").mkdir(parents=True)  # the rename onto the final name fails
    broken = shard_corpus(job(mixed_corpus, out))
    assert not broken.ok and broken.summary["shards_failed"] == 1
    assert "IsADirectoryError" in broken.summary["failed_shards"]["shard-000001.tar"]
    assert broken.index["incomplete"] == ["shard-000001.tar"]
    assert [e["url"] for e in broken.index["shards"]] == ["shard-000000.tar", "shard-000002.tar"]
    (out / "shard-000001.tar").rmdir()
    fixed = shard_corpus(job(mixed_corpus, out))
    assert fixed.ok and (fixed.summary["shards_written"], fixed.summary["shards_skipped"]) == (1, 2)
    assert "incomplete" not in fixed.index and len(fixed.index["shards"]) == 3


def test_processing_options_reencode_inside_the_tasks(ray_cluster, mixed_corpus, tmp_path, capsys):
    import av

    process = ProcessOptions(short_side=16, max_duration=0.5)
    outcome = shard_corpus(job(mixed_corpus, tmp_path / "out", n=12, process=process, progress=True))
    assert outcome.summary["samples"] == 6
    bar = capsys.readouterr().err
    assert "12/12" in bar and "shards 1/1" in bar and "MB/s" in bar
    for sample in wds.WebDataset(str(tmp_path / "out" / "shard-000000.tar"), shardshuffle=False):
        meta = json.loads(sample["json"])
        if "mp4" in sample:
            with av.open(io.BytesIO(sample["mp4"])) as c:
                frames = list(c.decode(video=0))
            assert (frames[0].width, frames[0].height, len(frames)) == (16, 16, 4)  # 0.5 s of an 8 fps clip
            assert meta["processing"]["frames"] == 4
        else:
            assert min(wds.autodecode.imagehandler("pil")("jpg", sample["jpg"]).size) == 16


def test_folder_of_media_with_sidecar_captions(ray_cluster, tmp_path, make_mp4):
    make_mp4(tmp_path / "media" / "a.mp4")
    (tmp_path / "media" / "a.txt").write_text("a clip\nthe same clip\n")
    write_jpg(tmp_path / "media" / "b" / "c.jpg", "red")
    (tmp_path / "media" / "b" / "c.txt").write_text("a red picture\n")
    write_jpg(tmp_path / "media" / "d.jpg", "blue")  # no sidecar
    outcome = shard_corpus(job(tmp_path / "media", tmp_path / "out"))
    assert outcome.index["samples"] == 2 and [f["reason"] for f in outcome.failures] == ["empty_caption"]
    samples = list(wds.WebDataset(str(tmp_path / "out" / "shard-000000.tar"), shardshuffle=False))
    assert [(s["__key__"], s["txt"]) for s in samples] == [("a", b"a clip"), ("b_c", b"a red picture")]
    assert json.loads(samples[0]["json"])["captions"] == ["a clip", "the same clip"]


def test_memory_urls_for_manifest_media_and_output(ray_cluster, mixed_corpus):
    """memory:// lives inside one process; the driver reads and writes it for the tasks."""
    fs = fsspec.filesystem("memory")
    root = mixed_corpus.parent
    for path in root.rglob("*"):
        if path.is_file():
            fs.pipe_file(f"/job_mem/corpus/{path.relative_to(root)}", path.read_bytes())
    outcome = shard_corpus(job("memory://job_mem/corpus/manifest.jsonl", "memory://job_mem/out"))
    assert outcome.summary["samples"] == 6
    assert {f["row"]: f["reason"] for f in outcome.failures} == expected_failures()
    index = json.loads(fs.cat_file("/job_mem/out/index.json"))
    for e in index["shards"]:
        assert hashlib.sha256(fs.cat_file(f"/job_mem/out/{e['url']}")).hexdigest() == e["sha256"]
    assert shard_corpus(job("memory://job_mem/corpus/manifest.jsonl", "memory://job_mem/out")).summary[
        "shards_skipped"] == 3
    fs.rm("/job_mem", recursive=True)


def test_s3_urls_through_s3fs(ray_cluster, mixed_corpus):
    fs = fsspec.filesystem("s3")
    fs.put(str(mixed_corpus.parent), "corpus-bucket/corpus", recursive=True)
    outcome = shard_corpus(job("s3://corpus-bucket/corpus/manifest.jsonl", "s3://corpus-bucket/shards"))
    assert outcome.summary["samples"] == 6
    assert {f["row"]: f["reason"] for f in outcome.failures} == expected_failures()
    index = json.loads(read_text("s3://corpus-bucket/shards/index.json"))
    keys = []
    for e in index["shards"]:
        data = fs.cat_file(f"corpus-bucket/shards/{e['url']}")
        assert hashlib.sha256(data).hexdigest() == e["sha256"] and len(data) == e["bytes"]
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            keys += [m.name.split(".")[0] for m in tar.getmembers() if m.name.endswith(".txt")]
    assert keys == GOOD_KEYS
    assert fs.exists("corpus-bucket/shards/failures.jsonl") and fs.exists("corpus-bucket/shards/summary.json")
    assert not [p for p in fs.ls("corpus-bucket/shards") if ".tmp-" in p]
    rerun = shard_corpus(job("s3://corpus-bucket/corpus/manifest.jsonl", "s3://corpus-bucket/shards"))
    assert rerun.summary["shards_skipped"] == 3 and rerun.index == index


def test_synthetic_corpus_shards_through_the_same_job(ray_cluster, synth_corpus, tmp_path):
    for manifest, media in (("videos.jsonl", "video"), ("images.jsonl", "image")):
        rows = (synth_corpus / manifest).read_text().splitlines()
        outcome = shard_corpus(job(synth_corpus / manifest, tmp_path / media, n=5))
        assert outcome.ok and outcome.failures == []
        assert outcome.index["media"] == media and outcome.index["samples"] == len(rows)
        tars = [str(tmp_path / media / e["url"]) for e in outcome.index["shards"]]
        samples = list(wds.WebDataset(tars, shardshuffle=False))
        assert [s["__key__"] for s in samples] == [json.loads(r)["key"] for r in rows]
        first = json.loads(samples[0]["json"])
        assert first["captions"] == json.loads(rows[0])["captions"] and "attributes" in first


def test_colliding_keys_and_bad_bytes_lose_no_row(ray_cluster, tmp_path, make_mp4):
    """Keys a, a-r2, a (the third renamed, and a-r2 is taken) and a caption byte that is not UTF-8: every good row is
    a sample of its own in the tars (counted with a plain tarfile scan), the bad row is a failure, none is lost."""
    for i in range(5):
        make_mp4(tmp_path / f"v{i}.mp4")
    captions = [b"one", b"two", b"three", b"caf\xe9 four", b"five"]
    keys = [b"a", b"a-r2", b"a", b"b", b"a-r2"]
    (tmp_path / "m.csv").write_bytes(b"key,path,caption\n" + b"".join(
        k + b",v%d.mp4," % i + c + b"\n" for i, (k, c) in enumerate(zip(keys, captions))))
    outcome = shard_corpus(job(tmp_path / "m.csv", tmp_path / "out", n=2))
    members = []
    for name in sorted(os.listdir(tmp_path / "out")):
        if name.endswith(".tar"):
            with tarfile.open(tmp_path / "out" / name) as tar:
                members += tar.getnames()
    samples = {m.rsplit(".", 1)[0] for m in members if m.endswith(".mp4")}
    assert len([m for m in members if m.endswith(".mp4")]) == len(samples) == 4  # no key twice
    assert len(members) == 3 * 4 and {m.rsplit(".", 1)[0] for m in members} == samples
    assert outcome.summary["samples"] == 4 and outcome.index["samples"] == 4
    assert [(f["row"], f["reason"]) for f in outcome.failures] == [(3, "not_utf8")]
    assert outcome.summary["rows"] == 5 == outcome.summary["samples"] + len(outcome.failures)
    texts = {}
    for name in sorted(os.listdir(tmp_path / "out")):
        if name.endswith(".tar"):
            with tarfile.open(tmp_path / "out" / name) as tar:
                texts.update({m.name: tar.extractfile(m).read() for m in tar if m.name.endswith(".txt")})
    assert sorted(texts.values()) == sorted([b"one", b"two", b"three", b"five"])

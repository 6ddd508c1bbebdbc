"""The loader end to end on real shards of real mp4s: coverage, batch contract, exact resume, skip accounting."""
from __future__ import annotations

import collections
import json

import pytest
import torch

from pipeline.config import ConfigError
from pipeline.data import build_loader
from pipeline.data.loader import batch_groups
from pipeline.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from data_shard_files import sample_files, tar_bytes


def all_keys(loader) -> list[str]:
    return [k for batch in loader for k in batch["key"]]


def test_every_sample_once_per_epoch_across_2_ranks_x_2_workers(shard_writer, data_cfg):
    index = shard_writer.corpus("v", shards=5, per_shard=3)
    cfg = data_cfg(index, num_workers=2, epochs=2)
    per_rank = [all_keys(build_loader(cfg, batch_size=2, rank=r, world_size=2, seed=7)) for r in range(2)]
    seen = collections.Counter(per_rank[0] + per_rank[1])
    assert sorted(seen) == [f"v{i:04d}" for i in range(15)]
    assert set(seen.values()) == {2}  # two epochs, each sample once per epoch
    assert not set(per_rank[0]) & set(per_rank[1])  # whole shards go to one (rank, worker)


def test_batches_follow_the_contract(shard_writer, data_cfg):
    videos = shard_writer.corpus("v", shards=2, per_shard=3)
    images = shard_writer.corpus("i", shards=2, per_shard=3, media="image")
    cfg = data_cfg(f"{videos},{images}", epochs=1)
    assert cfg.normalize == "imagenet"  # the official pipelines' normalization, by default
    loader = build_loader(cfg, batch_size=4, rank=0, world_size=1, seed=0)
    batches = list(loader)
    assert sum(len(b["key"]) for b in batches) == 12
    for b in batches:
        n = len(b["key"])
        assert b["video"].shape == (n, 3, 4, 32, 32) and b["video"].dtype == torch.float32
        assert b["is_image"].dtype == torch.bool and b["is_image"].tolist() == [k.startswith("i") for k in b["key"]]
        for key, text, captions in zip(b["key"], b["text"], b["captions"]):
            assert captions == [f"caption a of {key}", f"caption b of {key}"] and text in captions
    images_only = torch.cat([b["video"][b["is_image"]] for b in batches])
    # an image is a 1-frame clip repeated to T frames; the jpg is flat grey 200 (within JPEG rounding)
    assert torch.equal(images_only, images_only[:, :, :1].expand_as(images_only))
    expect = (200 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(images_only.mean(dim=(0, 2, 3, 4)), expect, atol=0.05)


def batches_after(loader, count: int) -> list[dict]:
    it = iter(loader)
    return [next(it) for _ in range(count)]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_yields_exactly_what_an_uninterrupted_run_yields(shard_writer, data_cfg, workers):
    v = shard_writer.corpus("v", shards=4, per_shard=5)
    i = shard_writer.corpus("i", shards=2, per_shard=4, media="image")
    cfg = data_cfg(f"{v},{i}", num_workers=workers, shuffle_buffer=4, weights=[2.0, 1.0])
    straight = batches_after(build_loader(cfg, 3, rank=1, world_size=2, seed=3), 12)

    first = build_loader(cfg, 3, rank=1, world_size=2, seed=3)
    head = batches_after(first, 5)
    state = json.loads(json.dumps(first.state_dict()))  # the position is plain data
    resumed = build_loader(cfg, 3, rank=1, world_size=2, seed=3)
    resumed.load_state_dict(state)
    tail = batches_after(resumed, 7)
    for a, b in zip(straight, head + tail):
        assert a["key"] == b["key"] and a["text"] == b["text"]
        assert torch.equal(a["video"], b["video"])  # same frames, same crops and flips


def test_per_batch_mixing_gives_whole_image_or_video_batches_alike_on_every_rank_and_resumes(shard_writer, data_cfg):
    """data.mix=batch (the official MetaLoader): a batch is all images or all videos ("images_only" says which,
    for mask.image_ratio), an image is one frame (the official use_image), each step has the same kind on both
    ranks, and a resumed loader goes on exactly."""
    v = shard_writer.corpus("v", shards=4, per_shard=5)
    i = shard_writer.corpus("i", shards=4, per_shard=4, media="image")
    cfg = data_cfg(f"{v},{i}", num_workers=2, shuffle_buffer=4, mix="batch")
    ranks = [batches_after(build_loader(cfg, 3, rank=r, world_size=2, seed=3), 12) for r in (0, 1)]
    for batches in ranks:
        for b in batches:
            assert len(set(b["is_image"].tolist())) == 1 and b["images_only"] == bool(b["is_image"][0])
            assert b["video"].shape[1:] == (3, 1 if b["images_only"] else 4, 32, 32)
    kinds = [[b["images_only"] for b in batches] for batches in ranks]
    assert kinds[0] == kinds[1] and 0 < sum(kinds[0]) < 12
    first = build_loader(cfg, 3, rank=1, world_size=2, seed=3)
    head = batches_after(first, 5)
    resumed = build_loader(cfg, 3, rank=1, world_size=2, seed=3)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert [b["key"] for b in head + batches_after(resumed, 7)] == [b["key"] for b in ranks[1]]
    mixed = batches_after(build_loader(data_cfg(f"{v},{i}", num_workers=2, shuffle_buffer=4), 3, 0, 2, seed=3), 12)
    assert any(len(set(b["is_image"].tolist())) == 2 and not b["images_only"] for b in mixed)
    assert all(b["video"].shape[2] == 4 for b in mixed)  # mixed batches: an image is 4 repeated frames


def test_dali_groups_hold_clips_of_one_frame_count():
    """DALI decodes a group of worker batches in one run and stacks it: with data.mix=batch, a 1-frame image batch
    after a video batch starts a new group (so does the reverse), and otherwise groups fill up to the sample count."""
    from types import SimpleNamespace

    def batch(frames, n=2):
        return {"encoded": [SimpleNamespace(plan=SimpleNamespace(indices=(0,) * frames))] * n}

    batches = [batch(4), batch(4), batch(1), batch(1), batch(1), {"state": {}}, batch(4), batch(4, 5), batch(4)]
    groups = list(batch_groups(batches, samples=4))
    assert [[len(b.get("encoded", ())) for b in g] for g in groups] == [[2, 2], [2, 2], [2, 0], [2, 5], [2]]
    for g in groups:
        assert len({len(b["encoded"][0].plan.indices) for b in g if b.get("encoded")}) == 1


def test_resume_is_exact_after_one_worker_has_finished_its_epochs(shard_writer, data_cfg):
    v = shard_writer.corpus("v", shards=3, per_shard=4)  # worker 0 reads two shards, worker 1 one
    cfg = data_cfg(v, num_workers=2, epochs=1)
    straight = [b["key"] for b in build_loader(cfg, 2, rank=0, world_size=1, seed=2)]
    assert len(straight) == 6
    first = build_loader(cfg, 2, rank=0, world_size=1, seed=2)
    head = [b["key"] for b in batches_after(first, 5)]  # worker 1 is done after batch 4
    resumed = build_loader(cfg, 2, rank=0, world_size=1, seed=2)
    resumed.load_state_dict(first.state_dict())
    assert head + [b["key"] for b in resumed] == straight


def test_resume_with_another_world_size_repeats_and_skips_nothing(shard_writer, data_cfg):
    v = shard_writer.corpus("v", shards=6, per_shard=4)
    old_cfg = data_cfg(v, num_workers=2, epochs=1)
    loaders = [build_loader(old_cfg, 2, rank=r, world_size=2, seed=1) for r in range(2)]
    taken = [k for loader in loaders for b in batches_after(loader, 2) for k in b["key"]]
    state = {**loaders[0].state_dict(), "ranks": [l.rank_state() for l in loaders]}  # as gathered over ranks
    new_cfg = data_cfg(v, num_workers=1, epochs=1)
    rest = []
    for r in range(3):
        loader = build_loader(new_cfg, 2, rank=r, world_size=3, seed=1)
        loader.load_state_dict(state)
        rest += all_keys(loader)
    assert len(taken) == 8
    assert sorted(taken + rest) == [f"v{i:04d}" for i in range(24)]


def test_bad_samples_are_skipped_and_counted_by_kind(shard_writer, data_cfg, clip_h264, jpg_bytes, tmp_path):
    import av

    empty = tmp_path / "empty.mp4"
    with av.open(str(empty), "w") as c:  # an mp4 header and no frames
        s = c.add_stream("libx264", rate=8)
        s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
        c.start_encoding()
    broken = clip_h264[:48] + bytes(len(clip_h264) - 48)
    special = {
        "v0001": sample_files(broken, "mp4", "v0001", ["x"]),
        "v0004": sample_files(clip_h264, "mp4", "v0004", None),
        "v0005": sample_files(empty.read_bytes(), "mp4", "v0005", ["x"]),
        "v0007": sample_files(jpg_bytes, "jpg", "v0007", ["x"]),
        "v0008": {"mp4": clip_h264, "json": json.dumps({"captions": 5}).encode()},
        "v0010": {"txt": b"no media"},
    }
    v = shard_writer.corpus("v", shards=3, per_shard=4, special=special)
    loader = build_loader(data_cfg(v, num_workers=2, epochs=1), 2, rank=0, world_size=1, seed=0)
    keys = all_keys(loader)
    assert sorted(keys) == sorted(f"v{i:04d}" for i in range(12) if f"v{i:04d}" not in special)
    assert loader.stats() == {"bad_metadata": 1, "corrupt_video": 1, "empty_video": 1, "missing_caption": 1,
                              "missing_media": 1, "wrong_type": 1}


def test_a_truncated_shard_costs_only_its_missing_samples(shard_writer, data_cfg, tmp_path):
    v = shard_writer.corpus("v", shards=2, per_shard=3)
    tar = tmp_path / "v" / "v-000001.tar"
    tar.write_bytes(tar.read_bytes()[:2000])  # keeps the first sample's mp4 only partly
    loader = build_loader(data_cfg(v, epochs=1), 4, rank=0, world_size=1, seed=0)
    keys = all_keys(loader)
    assert set(keys) >= {"v0000", "v0001", "v0002"} and len(keys) + sum(loader.stats().values()) == 6
    assert set(loader.stats()) <= {"unreadable_shard", "missing_sample", "corrupt_video", "missing_caption"}


def test_shards_missing_from_disk_are_named_and_an_endless_stream_stops_instead_of_waiting(
        shard_writer, data_cfg, tmp_path, caplog):
    """An index copied without its tars: every read fails. Each shard is logged by name; a reader that meets a whole
    epoch with no usable sample raises (an endless stream would otherwise never yield its first batch)."""
    from pipeline.data.loader import NoUsableSamples

    v = shard_writer.corpus("v", shards=2, per_shard=3)
    for tar in (tmp_path / "v").glob("*.tar"):
        tar.unlink()
    loader = build_loader(data_cfg(v, epochs=None), 4, rank=0, world_size=1, seed=0)
    with caplog.at_level("WARNING", logger="pipeline.data"), pytest.raises(NoUsableSamples) as e:
        next(iter(loader))
    assert "gave no usable sample" in str(e.value) and "v-000000.tar" in str(e.value)
    assert "'unreadable_shard': " in str(e.value)
    assert "v-000001.tar cannot be read" in caplog.text


def test_one_bad_corpus_among_good_ones_only_costs_its_samples(shard_writer, data_cfg, tmp_path):
    good = shard_writer.corpus("g", shards=2, per_shard=3)
    bad = shard_writer.corpus("b", shards=1, per_shard=3)
    (tmp_path / "b" / "b-000000.tar").unlink()
    loader = build_loader(data_cfg(f"{good},{bad}", epochs=None), 4, rank=0, world_size=1, seed=0)
    batches = iter(loader)
    keys = [k for _ in range(6) for k in next(batches)["key"]]
    assert len(keys) == 24 and {k[0] for k in keys} == {"g"} and loader.stats()["unreadable_shard"] > 0


def test_brace_patterns_and_memory_filesystem(clip_h264, data_cfg):
    import fsspec

    fs = fsspec.filesystem("memory")
    for s in range(2):
        samples = [(f"m{s}{j}", sample_files(clip_h264, "mp4", f"m{s}{j}", ["c"])) for j in range(3)]
        fs.pipe(f"/braces/m-{s:06d}.tar", tar_bytes(samples))
    loader = build_loader(data_cfg("memory://braces/m-{000000..000001}.tar", epochs=1), 4, 0, 1, seed=0)
    assert sorted(all_keys(loader)) == ["m00", "m01", "m02", "m10", "m11", "m12"]


def test_config_errors_name_the_problem(shard_writer, data_cfg, tmp_path):
    v = shard_writer.corpus("v", shards=1, per_shard=2)
    with pytest.raises(ConfigError, match="data.weights"):
        build_loader(data_cfg(v, weights=[1.0, 2.0]), 2, 0, 1, seed=0)
    with pytest.raises(ConfigError, match="nothere/index.json"):
        build_loader(data_cfg(str(tmp_path / "nothere/index.json")), 2, 0, 1, seed=0)
    with pytest.raises(ConfigError, match="data.train is empty"):
        build_loader(data_cfg(""), 2, 0, 1, seed=0)


def test_an_evaluation_loader_gives_the_same_pass_each_time(shard_writer, data_cfg):
    v = shard_writer.corpus("v", shards=1, per_shard=1)  # one sample for two workers: one of them has nothing
    loader = build_loader(data_cfg(v, num_workers=2), 2, rank=0, world_size=1, seed=0, train=False)
    first, second = list(loader), list(loader)
    assert [b["key"] for b in first] == [b["key"] for b in second] == [["v0000"]]
    assert torch.equal(first[0]["video"], second[0]["video"])


def test_auto_picks_the_cpu_decoder_without_a_gpu():
    from pipeline.data.decode import resolved_decoder_name

    assert resolved_decoder_name("auto") == ("dali" if torch.cuda.is_available() and _dali() else "cpu")
    with pytest.raises(ValueError, match="data.decoder"):
        resolved_decoder_name("gpu")


def _dali() -> bool:
    from pipeline.data.decode import dali_available

    return dali_available()


def _gathered_state(rank: int, index: str, init: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    from pipeline.config import DataConfig

    cfg = DataConfig(train=index, num_frames=2, img_size=16, decoder="cpu", num_workers=0, shuffle_buffer=4)
    loader = build_loader(cfg, 2, rank=rank, world_size=2, seed=0)
    next(iter(loader))
    state = loader.state_dict()
    torch.save(state, f"{out}/state{rank}.pt")
    dist.destroy_process_group()


def test_state_dict_gathers_every_rank_under_torch_distributed(shard_writer, tmp_path):
    import torch.multiprocessing as mp

    v = shard_writer.corpus("v", shards=4, per_shard=2)
    mp.spawn(_gathered_state, args=(v, f"file://{tmp_path}/rendezvous", str(tmp_path)), nprocs=2)
    states = [torch.load(tmp_path / f"state{r}.pt") for r in range(2)]
    assert states[0] == states[1] and [r["rank"] for r in states[0]["ranks"]] == [0, 1]
    assert all(r["slots"][0]["stream"]["draws"] == 2 for r in states[0]["ranks"])


def url_pattern(shard_writer, tmp_path, name="v", shards=3, per_shard=3) -> str:
    shard_writer.corpus(name, shards=shards, per_shard=per_shard)
    (tmp_path / name / "index.json").unlink()  # a foreign corpus: tars only
    return str(tmp_path / name / f"{name}-{{000000..{shards - 1:06d}}}.tar")


@pytest.mark.parametrize("cut", ["in_data", "in_header"])
def test_a_truncated_tar_in_a_url_pattern_corpus_is_used_as_far_as_it_reads(shard_writer, data_cfg, tmp_path,
                                                                          caplog, cut):
    """As inside an indexed corpus: the whole samples before the cut are used, the damage reported, the run goes on;
    data.strict=true refuses it instead, naming the tar."""
    import tarfile

    pattern = url_pattern(shard_writer, tmp_path)
    tar = tmp_path / "v" / "v-000001.tar"
    with tarfile.open(tar) as t:
        third = [m for m in t if m.name.startswith("v0005.")]  # the third sample of the second tar
    at = third[0].offset_data + 100 if cut == "in_data" else third[1].offset + 100
    tar.write_bytes(tar.read_bytes()[:at])
    with caplog.at_level("WARNING", logger="pipeline.data"):
        loader = build_loader(data_cfg(pattern, epochs=1), 4, rank=0, world_size=1, seed=0)
    assert loader.spec.corpora[0].counts == (3, 2, 3)
    assert "v-000001.tar" in caplog.text and "used" in caplog.text
    keys = all_keys(loader)
    assert sorted(keys) == sorted(f"v{i:04d}" for i in range(9) if i != 5)
    assert loader.stats() == {"damaged_shards": 1}
    assert build_loader(data_cfg(pattern, epochs=1), 4, rank=1, world_size=2, seed=0).stats() == {}  # once, rank 0
    with pytest.raises(ConfigError, match=r"cannot read shard .*v-000001.tar.*data.strict=true"):
        build_loader(data_cfg(pattern, epochs=1, strict=True), 4, rank=0, world_size=1, seed=0)


def test_video2dataset_stats_files_are_read_instead_of_the_tars(shard_writer, data_cfg, tmp_path):
    pattern = url_pattern(shard_writer, tmp_path)
    for i, successes in enumerate((2, 3)):  # shard 2 has none: scanned
        (tmp_path / "v" / f"v-{i:06d}_stats.json").write_text(json.dumps(
            {"count": 4, "successes": successes, "failed_to_download": 4 - successes, "failed_to_subsample": 0}))
    (tmp_path / "v" / "v-000000.tar").write_bytes(b"")  # the stats file is believed: the tar is not read now
    loader = build_loader(data_cfg(pattern, epochs=1), 4, rank=0, world_size=1, seed=0)
    assert loader.spec.corpora[0].counts == (2, 3, 3) and loader.spec.corpora[0].damaged == ()


def test_counts_are_kept_in_the_run_folder_and_a_resume_scans_nothing(shard_writer, data_cfg, tmp_path):
    pattern = url_pattern(shard_writer, tmp_path)
    run = tmp_path / "run"
    first = build_loader(data_cfg(pattern, epochs=1), 4, rank=0, world_size=1, seed=0, run_dir=str(run))
    kept = json.loads((run / "corpus_counts.json").read_text())
    assert kept[pattern]["counts"] == [3, 3, 3]
    state = next(iter(first)) and first.state_dict()
    for tar in (tmp_path / "v").glob("*.tar"):  # would read as (0, 0, 0) if scanned again
        tar.rename(tar.with_suffix(".moved"))
    again = build_loader(data_cfg(pattern, epochs=1), 4, rank=0, world_size=1, seed=0, run_dir=str(run))
    assert again.spec.corpora[0].counts == (3, 3, 3)
    for moved in (tmp_path / "v").glob("*.moved"):
        moved.rename(moved.with_suffix(".tar"))
    again.load_state_dict(state)  # the fingerprint (names and counts) matches: the position restores
    assert len(all_keys(again)) == 9 - 4


def test_a_stats_file_that_undercounts_is_reported_when_its_tar_is_read(shard_writer, data_cfg, tmp_path, caplog):
    """video2dataset's "successes" counts source videos; with clip subsampling a tar holds more samples."""
    pattern = url_pattern(shard_writer, tmp_path, shards=1)
    (tmp_path / "v" / "v-000000_stats.json").write_text(json.dumps({"count": 2, "successes": 2}))
    loader = build_loader(data_cfg(pattern, epochs=1), 4, rank=0, world_size=1, seed=0)
    with caplog.at_level("WARNING", logger="pipeline.data"):
        assert len(all_keys(loader)) == 2
    assert "v-000000.tar holds more than the 2 samples its count says" in caplog.text

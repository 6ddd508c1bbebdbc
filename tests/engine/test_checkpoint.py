"""Checkpoint directories: publication, verification, the newest complete one, pruning, leftovers (no DeepSpeed)."""
import json
import os
import random

import numpy as np
import pytest
import torch

from pipeline.engine import checkpoint as ckpt


def fake_checkpoint(root, step, world_size=1, payload=b"weights"):
    """Writes and publishes a checkpoint with the files the engine writes (contents made up)."""
    os.makedirs(root, exist_ok=True)
    temp = ckpt.fresh_temp_dir(root, step)
    os.makedirs(os.path.join(temp, ckpt.DEEPSPEED_TAG))
    with open(os.path.join(temp, ckpt.DEEPSPEED_TAG, "mp_rank_00_model_states.pt"), "wb") as f:
        f.write(payload * step)
    torch.save({"step": step}, os.path.join(temp, ckpt.TRAINER_STATE))
    for r in range(world_size):
        torch.save({"data": {"index": step}}, os.path.join(temp, ckpt.rank_file_name(r)))
    return ckpt.publish(temp, step, world_size)


def test_publish_renames_and_manifest_lists_every_file(tmp_path):
    root = str(tmp_path / "checkpoints")
    path = fake_checkpoint(root, 5, world_size=2)
    assert os.path.basename(path) == "step_00000005"
    assert not os.path.exists(ckpt.temp_dir_for(root, 5))
    manifest = ckpt.verify(path)
    assert manifest["step"] == 5 and manifest["world_size"] == 2
    assert set(manifest["files"]) == {"deepspeed/mp_rank_00_model_states.pt", "trainer_state.pt",
                                      "rank_00000.pt", "rank_00001.pt"}
    assert manifest["files"]["deepspeed/mp_rank_00_model_states.pt"]["size"] == len(b"weights") * 5


@pytest.mark.parametrize("damage, message", [
    ("drop_marker", "no COMPLETE.json"),
    ("truncate", "has 3 bytes"),
    ("flip_byte", "does not match its sha256"),
    ("delete_rank_file", "rank_00001.pt is missing"),
    ("garble_marker", "unreadable"),
])
def test_damaged_checkpoint_is_refused_naming_it(tmp_path, damage, message):
    path = fake_checkpoint(str(tmp_path), 4, world_size=2)
    weights = os.path.join(path, "deepspeed", "mp_rank_00_model_states.pt")
    if damage == "drop_marker":
        os.remove(os.path.join(path, ckpt.MARKER))
    elif damage == "truncate":
        with open(weights, "r+b") as f:
            f.truncate(3)
    elif damage == "flip_byte":
        data = bytearray(open(weights, "rb").read())
        data[0] ^= 0xFF
        open(weights, "wb").write(bytes(data))
    elif damage == "delete_rank_file":
        os.remove(os.path.join(path, "rank_00001.pt"))
    elif damage == "garble_marker":
        open(os.path.join(path, ckpt.MARKER), "w").write("{not json")
    with pytest.raises(ckpt.CorruptCheckpoint, match=message) as e:
        ckpt.verify(path)
    assert path in str(e.value)


def test_a_flipped_byte_inside_a_large_shard_is_caught(tmp_path):
    """Model and optimizer shards of real models are hundreds of MB: they are hashed too, not checked by size."""
    path = fake_checkpoint(str(tmp_path), 1, payload=os.urandom(20 << 20))
    weights = os.path.join(path, "deepspeed", "mp_rank_00_model_states.pt")
    with open(weights, "r+b") as f:
        f.seek(10 << 20)
        byte = f.read(1)
        f.seek(10 << 20)
        f.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(ckpt.CorruptCheckpoint, match="mp_rank_00_model_states.pt does not match its sha256"):
        ckpt.verify(path)


def test_newest_complete_skips_a_corrupt_newer_one(tmp_path, caplog):
    root = str(tmp_path)
    for step in (2, 4, 6):
        fake_checkpoint(root, step)
    os.remove(os.path.join(root, "step_00000006", ckpt.TRAINER_STATE))
    with caplog.at_level("WARNING"):
        ref = ckpt.newest_complete(root)
    assert ref.step == 4 and ref.path.endswith("step_00000004")
    assert "step_00000006" in caplog.text and "trainer_state.pt is missing" in caplog.text


def test_resolve_resume_forms(tmp_path):
    run = tmp_path / "run"
    root = ckpt.checkpoints_root(str(run))
    assert ckpt.resolve_resume("auto", str(run)) is None  # nothing yet: a fresh start
    assert ckpt.resolve_resume(None, str(run)) is None
    for step in (1, 3):
        fake_checkpoint(root, step)
    assert ckpt.resolve_resume("auto", str(run)).step == 3
    assert ckpt.resolve_resume(str(run), "elsewhere").step == 3  # a run directory
    assert ckpt.resolve_resume(root, "elsewhere").step == 3  # its checkpoints directory
    assert ckpt.resolve_resume(os.path.join(root, "step_00000001"), "elsewhere").step == 1
    os.remove(os.path.join(root, "step_00000001", ckpt.MARKER))
    with pytest.raises(ckpt.CorruptCheckpoint, match="step_00000001"):  # an explicit path must be complete
        ckpt.resolve_resume(os.path.join(root, "step_00000001"), "elsewhere")
    with pytest.raises(FileNotFoundError, match="neither"):
        ckpt.resolve_resume(str(tmp_path / "nowhere"), "elsewhere")


def test_prune_keeps_the_newest_and_leftovers_are_cleared(tmp_path):
    root = str(tmp_path)
    for step in (1, 2, 3, 4):
        fake_checkpoint(root, step)
    removed = ckpt.prune(root, keep_last=2)
    assert [os.path.basename(p) for p in removed] == ["step_00000001", "step_00000002"]
    assert [r.step for r in ckpt.list_checkpoints(root)] == [3, 4]
    os.makedirs(ckpt.temp_dir_for(root, 5))  # a save that was killed
    os.makedirs(os.path.join(root, ".trash-step_00000002"))  # a delete that was killed
    assert len(ckpt.clear_leftovers(root)) == 2
    assert sorted(os.listdir(root)) == ["step_00000003", "step_00000004"]
    assert ckpt.prune(root, keep_last=0) == []


def test_republishing_a_step_replaces_it(tmp_path):
    fake_checkpoint(str(tmp_path), 3, payload=b"old")
    path = fake_checkpoint(str(tmp_path), 3, payload=b"new!")
    assert ckpt.verify(path)["files"]["deepspeed/mp_rank_00_model_states.pt"]["size"] == 12
    assert os.listdir(tmp_path) == ["step_00000003"]


def test_rng_state_round_trip():
    ckpt.seed_everything(3)
    state = ckpt.rng_state()
    first = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(5), np.random.rand(2), random.random()
    ckpt.set_rng_state(state)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]


def test_manifest_file_is_valid_json_with_checksums(tmp_path):
    path = fake_checkpoint(str(tmp_path), 7)
    manifest = json.load(open(os.path.join(path, ckpt.MARKER)))
    assert all(len(e["sha256"]) == 64 for e in manifest["files"].values())

"""pipeline.safe_load: a file whose unpickling would run code is refused, naming the file and the global; nothing of
it runs; tensors, plain values, this project's and DeepSpeed's checkpoint types and official checkpoints' pickled
configs load."""
import argparse
import sys

import numpy as np
import pytest
import torch

from pipeline import safe_load
from pipeline.config import ConfigError
from pipeline.engine import checkpoint as ckpt
from tests.engine import engine_toy as toy
from tests.unsafe_files import write_bomb, write_bomb_run


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "plain-pickle"])
def test_a_file_that_would_run_code_is_refused_and_nothing_runs(tmp_path, legacy):
    marker = tmp_path / "MARKER"
    bomb = write_bomb(tmp_path / "bomb.pt", marker, legacy=legacy)
    with pytest.raises(ConfigError, match=f"{bomb}: refused") as e:
        safe_load.load(str(bomb), str(bomb))
    assert isinstance(e.value, safe_load.UnsafeFile)
    if not legacy:
        assert "posix.system" in str(e.value)
    with pytest.raises(safe_load.UnsafeFile):  # the official-checkpoint allowances do not let it through either
        safe_load.load(bomb.read_bytes(), "bytes", foreign_configs=True)
    assert not marker.exists()


def test_not_a_torch_file_is_refused_naming_it(tmp_path):
    path = tmp_path / "junk.pt"
    path.write_bytes(b"\x00not torch" * 10)
    with pytest.raises(ConfigError, match="junk.pt: refused: a weights-only load cannot read it"):
        safe_load.load(str(path), str(path))
    path.write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(ValueError, match="junk.pt: not a readable torch file"):
        safe_load.load(str(path), str(path))


def test_official_checkpoints_pickled_configs_load_as_plain_dicts(tmp_path, monkeypatch):
    """Official training checkpoints pickle their argparse.Namespace or the official code's EasyDict; they load
    without the class being imported (the module does not even exist here)."""
    pkg = tmp_path / "pkg" / "utils"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "easydict.py").write_text("class EasyDict(dict):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path / "pkg"))
    from utils.easydict import EasyDict  # noqa: the official code's module, only to write the file

    config = EasyDict(lr=1e-4)
    config.note = "x"
    torch.save({"model": {"w": torch.ones(2)}, "config": config, "args": argparse.Namespace(epochs=3)},
               tmp_path / "official.pth")
    monkeypatch.delitem(sys.modules, "utils.easydict")
    monkeypatch.delitem(sys.modules, "utils")
    monkeypatch.syspath_prepend(str(tmp_path / "elsewhere"))
    obj = safe_load.load(str(tmp_path / "official.pth"), "official.pth", foreign_configs=True)
    assert torch.equal(obj["model"]["w"], torch.ones(2)) and obj["config"]["lr"] == 1e-4
    assert "utils.easydict" not in sys.modules  # the class was never imported
    with pytest.raises(safe_load.UnsafeFile, match="utils.easydict.EasyDict"):  # only for official checkpoints
        safe_load.load(str(tmp_path / "official.pth"), "official.pth")


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_every_file_of_our_checkpoints_loads_safely(tmp_path, zero_stage):
    trainer = toy.build(str(tmp_path), max_steps=2, ckpt_every=2, zero_stage=zero_stage)
    trainer.fit()
    ref = ckpt.newest_complete(ckpt.checkpoints_root(str(tmp_path)))
    assert safe_load.check_torch_files(ref.path) >= 3
    rank = safe_load.load(f"{ref.path}/{ckpt.rank_file_name(0)}", "rank file")
    assert isinstance(rank["rng"]["numpy"][1], list)  # numpy's RNG state saved as plain values


def test_checkpoints_written_with_numpy_rng_states_still_resume(tmp_path):
    """Checkpoints of this project from before the RNG states became lists hold numpy arrays: allowed types."""
    np.random.seed(5)
    torch.save({"data": {}, "rng": {"numpy": np.random.get_state()}}, tmp_path / "old.pt")
    state = safe_load.load(str(tmp_path / "old.pt"), "old.pt")
    np.random.seed(6)
    ckpt.set_rng_state({"torch": torch.get_rng_state(), "python": __import__("random").getstate(),
                        "numpy": state["rng"]["numpy"]})
    np.random.seed(5)
    want = np.random.rand()
    np.random.set_state(state["rng"]["numpy"])
    assert np.random.rand() == want


def test_a_hostile_file_behind_matching_hashes_is_refused_before_deepspeed_reads_it(tmp_path):
    marker = tmp_path / "MARKER"
    step = write_bomb_run(tmp_path / "run", marker, hostile="deepspeed/mp_rank_00_model_states.pt")
    with pytest.raises(safe_load.UnsafeFile, match="deepspeed/mp_rank_00_model_states.pt: refused"):
        ckpt.model_state_dict(str(step))
    assert not marker.exists()


@pytest.mark.parametrize("zero_stage", [0, 1, 2])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_checkpoints_load_safely_and_resume(tmp_path, zero_stage, precision):
    """bf16/fp16 states hold DeepSpeed's loss scalers and bf16 optimizer records: all on the allowed list. fp16 needs
    a GPU (run with DS_ACCELERATOR=cuda there)."""
    if precision == "fp16" and not torch.cuda.is_available():
        pytest.skip("DeepSpeed's fp16 needs a GPU")
    toy.build(str(tmp_path), max_steps=2, ckpt_every=2, zero_stage=zero_stage, precision=precision).fit()
    ref = ckpt.newest_complete(ckpt.checkpoints_root(str(tmp_path)))
    assert safe_load.check_torch_files(ref.path) >= 3
    resumed = toy.build(str(tmp_path), max_steps=3, ckpt_every=3, zero_stage=zero_stage, precision=precision)
    assert resumed.fit(resume="auto").start_step == 2

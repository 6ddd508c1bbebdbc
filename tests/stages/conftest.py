"""Fixtures of the stage tests: shards of the session's synthetic corpus and a tiny open_clip teacher file, written
once per module that asks for them."""
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_clip
from tests.stages.stage_helpers import TEACHER, write_shards


@pytest.fixture(scope="module")
def shards(synth_corpus, tmp_path_factory):
    return write_shards(Path(synth_corpus), tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """A tiny open_clip model saved as open_clip does, its config JSON beside it."""
    folder = tmp_path_factory.mktemp("teacher")
    model = tiny_clip(folder, TEACHER, image_size=64)
    torch.save({"state_dict": model.state_dict()}, folder / "teacher.pt")
    return str(folder / "teacher.pt")

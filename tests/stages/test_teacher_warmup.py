"""The demo's tiny CLIP teacher learns from the synthetic frames, and stage 1 loads it through open_clip."""
import json

import pytest
import torch

from pipeline.config import TeacherConfig
from pipeline.models.teacher import build_teacher
from pipeline.stages.teacher_warmup import TINY_CLIP_NAME, train_tiny_clip


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from shards.synth import write_corpus

    out = tmp_path_factory.mktemp("warmup_corpus")
    write_corpus(str(out), videos=40, images=0, seed=1, size=32, frames=8, fps=8, eval_videos=2, workers=1,
                 progress=False)
    return out


def test_tiny_clip_learns_and_loads_as_a_teacher(corpus, tmp_path, one_thread):
    out = train_tiny_clip(str(corpus / "videos.jsonl"), str(tmp_path / "teacher" / "tiny_clip.pt"), steps=150,
                          img_size=32, seed=0, log_every=0)
    metrics = json.loads((tmp_path / "teacher" / "tiny_clip_metrics.json").read_text())
    assert metrics["loss_last10"] < 0.7 * metrics["loss_first10"], metrics
    assert metrics["train"]["top1"] > 4 * metrics["train"]["chance"], metrics
    assert (tmp_path / "teacher" / f"{TINY_CLIP_NAME}.json").exists()

    checkpoint = torch.load(out, weights_only=True)
    assert checkpoint["name"] == TINY_CLIP_NAME and "visual.conv1.weight" in checkpoint["state_dict"]
    teacher = build_teacher(TeacherConfig(model=TINY_CLIP_NAME, pretrained=out, img_size=32))
    assert torch.equal(teacher.visual.conv1.weight, checkpoint["state_dict"]["visual.conv1.weight"])
    assert teacher.grid == (2, 2)

"""The open_clip meanP video-text model: frame features normalized, mean-pooled over T, normalized; loaded from a
checkpoint file through the teacher's open_clip helpers."""
import pytest
import torch
import torch.nn.functional as F

from pipeline.config import ConfigError, RetrievalModelConfig
from pipeline.eval.models import OpenClipMeanP
from pipeline.stages.retrieval import load_retrieval_model
from pipeline.stages.teacher_warmup import save_open_clip
from tests.conftest import tiny_clip, tiny_clip_config

NAME = "meanp-clip"


def test_video_features_are_the_normalized_mean_of_normalized_frame_features(tmp_path, one_thread):
    clip = tiny_clip(tmp_path, NAME, image_size=32).eval()
    path = save_open_clip(clip, NAME, tiny_clip_config(image_size=32), str(tmp_path / "clip.pt"))
    model = load_retrieval_model(RetrievalModelConfig(kind="open_clip", name=NAME), path, 32, torch.device("cpu"))
    assert isinstance(model, OpenClipMeanP) and model.match_logits is None
    assert model.frames.box == "centre" and model.frames.interp == "bicubic"  # open_clip's own preprocessing
    torch.manual_seed(1)
    clips = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        frames = F.normalize(clip.encode_image(clips[1].transpose(0, 1)), dim=-1)
    expected = F.normalize(frames.mean(dim=0), dim=-1)
    videos = model.encode_videos(clips)
    assert videos.shape == (2, 48) and torch.allclose(videos[1], expected, atol=1e-5)
    assert torch.allclose(videos.norm(dim=-1), torch.ones(2), atol=1e-5)
    texts = model.encode_texts(["a red circle", "two blue squares", "a red circle"], 32)
    assert texts.shape == (3, 48) and torch.allclose(texts[0], texts[2])
    assert torch.allclose(texts.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_a_missing_checkpoint_names_the_option(tmp_path):
    with pytest.raises(ConfigError, match=r"--checkpoint='.*none.pt': no such checkpoint file"):
        load_retrieval_model(RetrievalModelConfig(name=NAME), str(tmp_path / "none.pt"), 32, torch.device("cpu"))


"""Stage 2 end to end on the CPU: a short stage-1 run, then `videomamba pretrain` of stage 2 from it on tiny real
shards (VTC, VTM on hard negatives, MLM and the alignment to a tiny open_clip teacher loaded from a file), an exact
`--resume auto`, and `videomamba eval` of the stage-2 run as a VideoMamba video-text model with VTM re-ranking."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.stages.stage_helpers import REPO, TEACHER, metrics, run_cli, stage_args, write_shards

pytestmark = pytest.mark.slow
BERT = []  # the session's tiny BERT directory (the tiny_bert_dir fixture), for stage2_args


@pytest.fixture(autouse=True)
def _bert(tiny_bert_dir):
    BERT[:] = [tiny_bert_dir]


def stage2_args(shards, teacher_file, out, init, steps, extra=(), bert=None):
    return ["pretrain", "--config", str(REPO / "configs" / "stage2_video_text.yaml"), f"init={init}",
            f"data.train={shards}", f"teacher.model={TEACHER}", f"teacher.pretrained={teacher_file}",
            "teacher.img_size=64", "data.img_size=64", "data.num_frames=4", "data.num_workers=1",
            "model.depth=2", "model.embed_dim=64", "model.scan_backend=torch", "model.drop_path_rate=0.0",
            f"text.pretrained={bert or BERT[0]}", "text.fusion_layer=2", "text.max_len=24", "text.embed_dim=32", f"train.max_steps={steps}", "train.batch_size=4", "train.lr=1.0e-3",
            "train.warmup_steps=5", "train.ckpt_every=15", "train.progress=false", "train.tensorboard=false",
            f"train.out={out}", *extra]


@pytest.fixture(scope="module")
def stage1_run(shards, teacher_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1") / "run"
    done = run_cli(stage_args(shards, teacher_file, out, steps=10, extra=["train.ckpt_every=10"]))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_stage2_learns_from_a_stage1_run_resumes_exactly_and_evaluates(shards, teacher_file, stage1_run,
                                                                       synth_corpus, tmp_path):
    out = tmp_path / "stage2"
    corpus = Path(synth_corpus)
    evaluation = ["train.eval_every=10", f"eval.annotations={corpus / 'eval' / 'msrvtt_test.json'}",
                  f"eval.videos={corpus / 'eval' / 'videos'}", "eval.num_workers=0", "eval.rerank_k=4"]
    done = run_cli(stage2_args(shards, teacher_file, out, stage1_run, steps=30, extra=evaluation))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "stage video_text done" in done.stdout
    assert "starts from" in done.stderr and "backbone and alignment head" in done.stderr

    records = metrics(out)
    assert [r["step"] for r in records] == list(range(1, 31))
    assert all({"vtc", "vtm", "mlm", "align"} <= r.keys() for r in records)
    assert all(r["loss"] == pytest.approx(r["vtc"] + r["vtm"] + r["mlm"] + r["align"], rel=1e-5) for r in records)
    evaluated = [r for r in records if "eval/t2v_r1" in r]  # zero-shot retrieval on the training model
    assert [r["step"] for r in evaluated] == [10, 20, 30]
    assert all(0 <= r["eval/t2v_r1"] <= 100 and "eval/itc_v2t_r1" in r for r in evaluated)
    mlm = [r["mlm"] for r in records]
    # from ~log(vocabulary) towards the captions' pieces (the session's tiny BERT knows the fixture's words whole,
    # the shards' other words by their characters: 4.34 -> 4.09 over the 30 steps on the 2-core CI machine)
    assert np.mean(mlm[-10:]) < np.mean(mlm[:10]) - 0.1, mlm
    losses = [r["loss"] for r in records]
    assert np.mean(losses[-10:]) < np.mean(losses[:10]), losses
    assert yaml.safe_load((out / "config.yaml").read_text())["stage"] == "video_text"

    copy = tmp_path / "resumed"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "checkpoints" / "step_00000030")
    again = run_cli(stage2_args(shards, teacher_file, copy, stage1_run, steps=30, extra=evaluation)
                    + ["--resume", "auto"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert '"start_step": 15' in again.stdout
    resumed = metrics(copy)
    assert [r["loss"] for r in resumed] == [r["loss"] for r in records]  # masks, negatives, MLM draws too
    assert [r["eval/t2v_r1"] for r in resumed if "eval/t2v_r1" in r] == [r["eval/t2v_r1"] for r in evaluated]

    scored = run_cli(["eval", "--config", str(REPO / "configs" / "eval_retrieval.yaml"), "--checkpoint", str(out),
                      "--dataset", "msrvtt", "--annotations", str(corpus / "eval" / "msrvtt_test.json"),
                      "--videos", str(corpus / "eval" / "videos"), "--out", str(tmp_path / "eval"),
                      "model.kind=videomamba", "data.num_frames=4", "data.img_size=64", "eval.num_workers=0",
                      "eval.rerank_k=4"])
    assert scored.returncode == 0, scored.stderr[-3000:]
    result = json.loads((tmp_path / "eval" / "retrieval_msrvtt.json").read_text())
    assert result["counts"]["videos_evaluated"] == result["counts"]["videos"] > 0
    assert result["rerank"]["applied"] and "img_r1" in result["metrics"]["reranked"]
    assert result["model"] == "videomamba stage-2 video-text model"
    # fed the normalization it was trained with: data.normalize of its config.yaml (ImageNet's by default)
    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["normalize"] == "imagenet"
    assert result["protocol"]["frames_preprocessing"]["mean"] == [0.485, 0.456, 0.406]


def test_stage2_in_whole_image_and_video_batches_masks_images_at_their_own_ratio(shards, teacher_file, stage1_run,
                                                                                  synth_corpus, tmp_path):
    """data.mix=batch + mask.image_ratio=0.5 (the official MetaLoader, use_image and image_mask_ratio) on video and
    image shards: batches of each kind train, an image is one frame whose student sees 0.5 of its tokens (8 of the
    4x4 grid's 16), a video batch's frames 0.2 each (3 of 16: round(0.8 * 16) = 13 masked)."""
    images = write_shards(Path(synth_corpus), tmp_path / "image_shards", media="image")
    out = tmp_path / "run"
    done = run_cli(stage2_args(f"{shards},{images}", teacher_file, out, stage1_run, steps=8,
                               extra=["data.mix=batch", "mask.image_ratio=0.5", "train.ckpt_every=0",
                                      "train.log_every=1"]))
    assert done.returncode == 0, done.stderr[-3000:]
    records = metrics(out)
    assert [r["step"] for r in records] == list(range(1, 9)) and all(r["align"] > 0 for r in records)
    from pipeline.config import VideoTextStageConfig, load_config
    from pipeline.data import build_loader
    from pipeline.masking import build_mask
    from pipeline.objectives import VideoTextObjective, grid_of

    cfg = load_config(VideoTextStageConfig, str(out / "config.yaml"))  # the run's loader, batch by batch
    batches = iter(build_loader(cfg.data, cfg.train.batch_size, 0, 1, cfg.train.seed))
    seen = [next(batches) for _ in records]
    kinds = [b["images_only"] for b in seen]
    assert 0 < sum(kinds) < len(kinds), kinds  # the 8 steps had image batches and video batches
    assert [b["video"].shape[2] for b in seen] == [1 if kind else 4 for kind in kinds]
    objective = VideoTextObjective(None, 24, (4, 4, 4), "random", 0.8, {}, image_ratio=0.5)
    ratios = [objective.ratio_of({"images_only": kind}) for kind in (True, False)]
    assert ratios == [0.5, 0.8] and objective.ratio_of({}) == 0.8  # a batch without the key: the video ratio
    grids = [grid_of(torch.zeros(1, 3, t, 32, 32), (4, 4, 4)) for t in (1, 4)]
    assert grids == [(1, 4, 4), (4, 4, 4)]
    assert [int((~build_mask("attention", r, g, 1, attention=torch.rand(1, math.prod(g)))).sum())
            for r, g in zip(ratios, grids)] == [8, 4 * 3]
    bad = run_cli(stage2_args(shards, teacher_file, tmp_path / "x", stage1_run, steps=2,
                              extra=["mask.image_ratio=0.5"]))
    assert bad.returncode == 2 and "mask.image_ratio=0.5" in bad.stderr and "data.mix=batch" in bad.stderr
    bad = run_cli(stage2_args(shards, teacher_file, tmp_path / "y", stage1_run, steps=2,
                              extra=["data.mix=batch", "model.tubelet_size=2"]))
    assert bad.returncode == 2 and "model.tubelet_size=2" in bad.stderr and "1-frame" in bad.stderr
    bad = run_cli(stage2_args(shards, teacher_file, tmp_path / "z", stage1_run, steps=2,  # 62 of 64, but 16 of 16
                              extra=["data.mix=batch", "mask.kind=random", "mask.image_ratio=0.97"]))
    assert bad.returncode == 2 and "mask.image_ratio=0.97" in bad.stderr and "(1, 4, 4)" in bad.stderr


def test_stage2_config_errors_exit_2_naming_the_key(shards, teacher_file, tmp_path, capsys):
    bad = run_cli(stage2_args(shards, teacher_file, tmp_path / "x", tmp_path / "nowhere", steps=2,
                              extra=["text.fusion_layer=5"]))
    assert bad.returncode == 2 and "text.fusion_layer=5" in bad.stderr, bad.stderr[-2000:]
    missing = run_cli(stage2_args(shards, teacher_file, tmp_path / "y", tmp_path / "nowhere", steps=2,
                                  bert=str(tmp_path / "no-bert")))
    assert missing.returncode == 2 and "huggingface-cli download" in missing.stderr, missing.stderr[-2000:]


def test_stage2_under_torchrun_contrasts_the_global_batch(shards, teacher_file, stage1_run, tmp_path):
    """2 CPU processes, ZeRO-2, no teacher: VTC runs on the embeddings gathered from both ranks (the arithmetic of
    the global loss is checked in tests/test_losses.py) and the run checkpoints both ranks."""
    out = tmp_path / "run"
    args = stage2_args(shards, teacher_file, out, stage1_run, steps=3,
                       extra=["deepspeed.zero_stage=2", "train.ckpt_every=3", "loss.align=0", "mask.kind=random"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", "-m", "pipeline.cli", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    records = metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3] and all("align" not in r for r in records)
    assert {"rank_00000.pt", "rank_00001.pt", "COMPLETE.json"} <= set(os.listdir(out / "checkpoints" / "step_00000003"))


def test_stage2_starts_from_a_released_video_mm_checkpoint_file(shards, teacher_file, tiny_bert_dir, tmp_path):
    """init=FILE.pth: a fake official video_mm container (8 frames at 224 px) of this config's shapes starts the whole
    model, its position embeddings fitted to 4 frames at 64 px, its clip_decoder the alignment head (the teacher's
    width: 48)."""
    import torch
    from transformers import BertConfig

    from tests.models.official_layout import fake_official_video_mm

    bert = BertConfig.from_pretrained(tiny_bert_dir)
    checkpoint = fake_official_video_mm(
        depth=2, width=64, embed_dim=32, clip_teacher=dict(width=32, layers=1, output_dim=16), clip_output_dim=48,
        bert=dict(hidden=bert.hidden_size, layers=bert.num_hidden_layers, fusion_layer=2, vocab=bert.vocab_size,
                  max_positions=bert.max_position_embeddings))
    path = tmp_path / "videomamba_fake_f8_res224.pth"
    torch.save(checkpoint, path)
    done = run_cli(stage2_args(shards, teacher_file, tmp_path / "run", path, steps=2, extra=["train.ckpt_every=2"]))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "the whole video-text model" in done.stderr and "temporal_pos_embedding: 8 -> 4" in done.stderr
    assert "clip_teacher.*" in done.stderr and "clip_decoder" not in done.stderr  # loaded into the head
    assert [r["step"] for r in metrics(tmp_path / "run")] == [1, 2]


def test_stage2_names_its_backbone_text_and_fusion_chains(tiny_bert_dir, tmp_path):
    """What `train.cuda_graph_chains` picks from: the backbone's blocks, BERT's text-only layers and its fusion
    layers, each in the order the step runs them."""
    from pipeline.config import VideoTextStageConfig, load_config
    from pipeline.stages.base import begin_run
    from pipeline.stages.video_text import video_text_parts

    cfg = load_config(VideoTextStageConfig, str(REPO / "configs" / "stage2_video_text.yaml"),
                      ["data.train=unused.tar", "data.img_size=64", "data.num_frames=2", "model.depth=2",
                       "model.embed_dim=64", "model.scan_backend=torch", f"text.pretrained={tiny_bert_dir}",
                       "text.fusion_layer=1", "loss.align=0", f"train.out={tmp_path}"])
    begin_run(cfg)
    parts = video_text_parts(cfg, None)
    layers = list(parts.model.text_encoder.bert.encoder.layer)
    assert parts.graph_chains["text"] == layers[:1] and parts.graph_chains["fusion"] == layers[1:]
    assert parts.graph_chains["backbone"] == parts.model.backbone.chained_blocks() and len(layers) == 3
    assert cfg.train.cuda_graph_chains == ["backbone", "text", "fusion"]  # all three under train.cuda_graphs

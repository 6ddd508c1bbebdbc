"""`videomamba eval` end to end: a tiny open_clip model saved as a file, a tiny synthetic corpus with a corrupt and a
missing video added to its annotations (stopping before scoring, or with eval.allow_missing scored "on N of M"), the
output files and scores.npz, the printed table, CLIP4Clip's csv with the benchmark detected, UMT's re-ranking with a
real matching head, and exit 2 for bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from pipeline.cli import main
from pipeline.config import RetrievalConfig
from pipeline.eval.scores import metrics_from_scores
from pipeline.stages.teacher_warmup import save_open_clip
from tests.conftest import tiny_clip, tiny_clip_config

REPO = Path(__file__).resolve().parents[2]
NAME = "eval-clip"
OVERRIDES = [f"model.name={NAME}", "data.num_frames=2", "data.img_size=32", "eval.batch_size=4", "eval.num_workers=0"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A corpus with 5 eval videos (plus broken.mp4, not a video, and gone.mp4, absent) and a saved tiny CLIP."""
    from shards.synth import write_corpus

    root = tmp_path_factory.mktemp("retrieval")
    write_corpus(str(root / "corpus"), videos=1, images=0, seed=3, size=32, frames=8, fps=8, eval_videos=5,
                 workers=1, progress=False)
    eval_dir = root / "corpus" / "eval"
    (eval_dir / "videos" / "broken.mp4").write_bytes(b"not an mp4 at all" * 10)
    entries = json.loads((eval_dir / "msrvtt_test.json").read_text())
    entries += [{"video": "broken.mp4", "caption": "a broken clip"}, {"video": "gone.mp4", "caption": "a lost clip"}]
    (root / "with_bad.json").write_text(json.dumps(entries))
    model = tiny_clip(root / "model", NAME, image_size=32)
    checkpoint = save_open_clip(model, NAME, tiny_clip_config(image_size=32), str(root / "model" / "clip.pt"))
    return {"root": root, "videos": eval_dir / "videos", "checkpoint": checkpoint, "good": eval_dir / "msrvtt_test.json",
            "msvd": eval_dir / "msvd_test.json", "with_bad": root / "with_bad.json"}


def eval_command(setup, out, dataset="msrvtt", annotations=None, *extra):
    return [sys.executable, "-m", "pipeline.cli", "eval", "--config", str(REPO / "configs" / "eval_retrieval.yaml"),
            "--checkpoint", setup["checkpoint"], "--dataset", dataset,
            "--annotations", str(annotations or setup["with_bad"]), "--videos", str(setup["videos"]),
            "--out", str(out), *OVERRIDES, *extra]


def run_eval(setup, out, *extra, annotations=None, dataset="msrvtt"):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    command = eval_command(setup, out, dataset, annotations, *extra)
    if dataset is None:
        at = command.index("--dataset")
        del command[at:at + 2]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_missing_or_broken_videos_stop_a_benchmark_before_scoring(setup, tmp_path):
    done = run_eval(setup, tmp_path / "out")
    assert done.returncode == 1, done.stderr[-3000:]
    assert "2 of the 7 msrvtt videos under" in done.stdout and "eval.allow_missing=true scores the other 5" in done.stdout
    assert "broken.mp4: corrupt_video" in done.stdout and "gone.mp4: missing" in done.stdout
    assert not (tmp_path / "out").exists()


def test_allow_missing_scores_the_rest_and_says_on_n_of_m_writing_json_md_png_and_scores(setup, tmp_path):
    out = tmp_path / "out"
    done = run_eval(setup, out, "eval.allow_missing=true")
    assert done.returncode == 0, done.stderr[-3000:]

    result = json.loads((out / "retrieval_msrvtt.json").read_text())
    assert result["counts"] == {"videos": 7, "texts": 7, "videos_evaluated": 5, "texts_evaluated": 5,
                                "videos_skipped": 2}
    assert result["coverage"] == "on 5 of 7 videos"
    skipped = {s["video"]: s for s in result["skipped"]}
    assert skipped["gone.mp4"]["kind"] == "missing" and skipped["broken.mp4"]["kind"] == "corrupt_video"
    m = result["metrics"]["contrastive"]
    assert m["t2v_queries"] == m["v2t_queries"] == 5
    assert m["img_r5"] == m["img_r10"] == m["txt_r5"] == 100.0  # 5 candidates: every rank is within 5
    assert 0.0 <= m["img_r1"] <= 100.0 and 1 <= m["t2v_MdR"] <= 5 and 1 <= m["v2t_MnR"] <= 5
    assert m["r_mean"] == pytest.approx((m["txt_r_mean"] + m["img_r_mean"]) / 2)
    assert result["chance_r1"] == pytest.approx(20.0) and "reranked" not in result["metrics"]
    assert result["rerank"] == {"k": 128, "applied": False, "why": "the model has no video-text matching head"}
    assert result["config"]["model"]["name"] == NAME and result["config"]["data"]["num_frames"] == 2
    assert result["protocol"]["text_length"] == tiny_clip_config()["text_cfg"]["context_length"]  # its own
    assert result["protocol"]["benchmark_text_length"] == 32
    assert result["protocol"]["frames_preprocessing"]["box"] == "centre"  # open_clip's own
    assert set(result["timing"]) >= {"decode", "video_encoding", "text_encoding", "rerank"}

    assert metrics_from_scores(result["outputs"]["scores"]) == result["metrics"]
    table = (out / "retrieval_msrvtt.md").read_text()
    assert table.startswith("## Zero-shot retrieval: msrvtt on 5 of 7 videos")
    assert "| contrastive | text→video |" in table and "| contrastive | video→text |" in table
    assert "- broken.mp4: corrupt_video" in table and "- gone.mp4: missing" in table
    assert table.strip() in done.stdout and "R@1" in done.stdout.splitlines()[-1]
    assert "on 5 of 7 videos" in done.stdout.splitlines()[-1]
    with Image.open(out / "retrieval_msrvtt.png") as chart:
        assert chart.format == "PNG" and chart.size == (480, 260)


def test_clip4clip_csv_is_detected_as_msrvtt(setup, tmp_path):
    entries = json.loads(setup["good"].read_text())
    csv = tmp_path / "MSRVTT_JSFUSION_test.csv"
    csv.write_text("key,vid_key,video_id,sentence\n" + "".join(
        f"ret{i},msr{i},{e['video'][:-4]},{e['caption']}\n" for i, e in enumerate(entries)))
    done = run_eval(setup, tmp_path / "out", annotations=csv, dataset=None)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "retrieval_msrvtt.json").read_text())
    assert result["format"] == "clip4clip-csv" and result["counts"]["videos_evaluated"] == len(entries)
    assert result["coverage"] is None and "on " not in done.stdout.splitlines()[-1].split(";")[0]


def test_msvd_format_counts_every_caption_as_a_query(setup, tmp_path, one_thread):
    code = main(eval_command(setup, tmp_path, "msvd", setup["msvd"], "--no-progress")[3:])
    assert code == 0
    result = json.loads((tmp_path / "retrieval_msvd.json").read_text())
    captions = sum(len(e["caption"]) for e in json.loads(setup["msvd"].read_text()))
    assert result["counts"]["texts_evaluated"] == captions > 5
    assert result["metrics"]["contrastive"]["t2v_queries"] == captions
    assert result["metrics"]["contrastive"]["v2t_queries"] == 5


def test_frames_and_size_default_to_the_runs_own(tmp_path):
    """A videomamba run's evaluation takes the run's data.num_frames and data.img_size unless set; other models
    (and a checkpoint outside a run) take 8 frames of 224 px."""
    from pipeline.config import VideoTextStageConfig, load_config, write_resolved
    from pipeline.stages.retrieval import with_run_frames

    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    write_resolved(load_config(VideoTextStageConfig, None, ["data.num_frames=4", "data.img_size=64"]),
                   str(tmp_path / "run" / "config.yaml"))
    videomamba = load_config(RetrievalConfig, str(REPO / "configs" / "eval_retrieval.yaml"), ["model.kind=videomamba"])
    assert videomamba.data.num_frames is None and videomamba.data.img_size is None
    for checkpoint in ("run", "run/checkpoints"):
        cfg = with_run_frames(videomamba, str(tmp_path / checkpoint))
        assert (cfg.data.num_frames, cfg.data.img_size) == (4, 64)
    videomamba.data.num_frames = 12
    assert (with_run_frames(videomamba, str(tmp_path / "run")).data.num_frames,
            with_run_frames(videomamba, str(tmp_path / "run")).data.img_size) == (12, 64)
    clip = with_run_frames(RetrievalConfig(), str(tmp_path / "run"))
    assert (clip.data.num_frames, clip.data.img_size) == (8, 224)


def test_a_runs_normalization_comes_from_its_config_yaml(tmp_path):
    """The evaluation feeds a run the normalization it was trained with: data.normalize of its config.yaml
    (imagenet by default), and CLIP's for a run written before the key existed (the project's normalization then)."""
    from pipeline.config import AlignStageConfig, VideoTextStageConfig, load_config, write_resolved
    from pipeline.data.transforms import IMAGENET_MEAN, CLIP_STD, run_eval_frames
    from pipeline.stages.base import run_normalization

    for name, schema, overrides, expected in (("default", VideoTextStageConfig, [], "imagenet"),
                                              ("stage1", AlignStageConfig, [], "imagenet"),
                                              ("clip", VideoTextStageConfig, ["data.normalize=clip"], "clip")):
        write_resolved(load_config(schema, None, overrides), str(tmp_path / f"{name}.yaml"))
        assert run_normalization(str(tmp_path / f"{name}.yaml")) == expected
    older = yaml.safe_load((tmp_path / "default.yaml").read_text())
    del older["data"]["normalize"]
    (tmp_path / "older.yaml").write_text(yaml.safe_dump(older))
    assert run_normalization(str(tmp_path / "older.yaml")) == "clip"
    assert run_eval_frames("imagenet").mean == IMAGENET_MEAN and run_eval_frames("clip").std == CLIP_STD
    assert (run_eval_frames("clip").box, run_eval_frames("clip").interp) == ("whole", "bicubic")  # official geometry


@pytest.mark.parametrize("change,message", [
    (("--dataset", "youcook"), "--dataset 'youcook' is not one of msrvtt"),
    (("--annotations", "/nonexistent/ann.json"), "annotations file not found: /nonexistent/ann.json"),
    (("--videos", "/nonexistent/videos"), "--videos /nonexistent/videos: no such folder"),
    (("--checkpoint", "/nonexistent/clip.pt"), "--checkpoint='/nonexistent/clip.pt': no such checkpoint file"),
])
def test_bad_input_exits_2_naming_it(setup, tmp_path, capsys, change, message):
    argv = eval_command(setup, tmp_path)[3:]
    argv[argv.index(change[0]) + 1] = change[1]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "retrieval_msrvtt.json").exists()


def test_an_annotations_file_of_no_benchmark_needs_dataset(setup, tmp_path, capsys):
    argv = eval_command(setup, tmp_path)[3:]
    at = argv.index("--dataset")
    del argv[at:at + 2]
    assert main(argv) == 2
    assert "with_bad.json: cannot tell which benchmark this is from its name; name it with --dataset" in \
        capsys.readouterr().err


def test_bad_config_value_exits_2(setup, tmp_path, capsys):
    assert main(eval_command(setup, tmp_path)[3:] + ["eval.batch_size=0"]) == 2
    assert "'eval.batch_size' must be >= 1, got 0" in capsys.readouterr().err  # refused as the config loads


def test_a_released_video_mm_checkpoint_evaluates_end_to_end(setup, tiny_bert_dir, capsys):
    """A fake official video_mm file (random tensors in the exact official layout of VideoMamba-Ti, 8 frames at
    224 px, with the CLIP teacher, in the training container) evaluated directly with model.size / text.pretrained:
    position embeddings fitted to 2 frames at 32 px, the matching head re-ranks."""
    import torch
    from transformers import BertConfig

    from tests.models.official_layout import fake_official_video_mm

    bert = BertConfig.from_pretrained(tiny_bert_dir)
    checkpoint = fake_official_video_mm(
        depth=24, width=192, embed_dim=512, clip_teacher=dict(width=32, layers=1, output_dim=16),
        bert=dict(hidden=bert.hidden_size, layers=bert.num_hidden_layers, fusion_layer=2, vocab=bert.vocab_size,
                  max_positions=bert.max_position_embeddings))
    path = setup["root"] / "videomamba_t16_fake_f8_res224.pth"
    torch.save(checkpoint, path)
    out = setup["root"] / "out_official"
    code = main(["eval", "--config", str(REPO / "configs" / "eval_retrieval.yaml"), "--checkpoint", str(path),
                 "--dataset", "msrvtt", "--annotations", str(setup["good"]), "--videos", str(setup["videos"]),
                 "--out", str(out), "--no-progress", "model.kind=videomamba", "model.size=tiny",
                 f"text.pretrained={tiny_bert_dir}", "text.fusion_layer=2", "data.num_frames=2", "data.img_size=32",
                 "eval.batch_size=4", "eval.num_workers=0", "eval.rerank_k=3"])
    assert code == 0, capsys.readouterr().err[-3000:]
    result = json.loads((out / "retrieval_msrvtt.json").read_text())
    assert result["counts"]["videos_evaluated"] == 5
    assert result["rerank"]["applied"]

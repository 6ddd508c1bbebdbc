"""No file a user names runs code when loaded: a torch file whose unpickling would create a marker file, given on
each path the commands read checkpoints from, is refused with exit 2 naming it, and the marker never appears. The
run-folder cases put the hostile file inside a checkpoint whose manifest hashes match it."""
import pytest
import yaml

from pipeline.config import VideoTextStageConfig, resolved_dict
from tests.stages.stage_helpers import REPO, run_cli, stage_args
from tests.unsafe_files import write_bomb, write_bomb_run

TINY_STAGE2 = {"model.depth": 2, "model.embed_dim": 64, "model.scan_backend": "torch", "text.fusion_layer": 2,
               "text.max_len": 24, "text.embed_dim": 32}


def refused(done, marker, named):
    assert not marker.exists(), "the hostile file ran"
    assert done.returncode == 2, done.stderr[-3000:]
    assert str(named) in done.stderr and "refused" in done.stderr, done.stderr[-3000:]


def stage2_config_yaml(bert: str) -> str:
    cfg = resolved_dict(VideoTextStageConfig())
    cfg["text"]["pretrained"] = bert
    for dotted, value in TINY_STAGE2.items():
        section, key = dotted.split(".")
        cfg[section][key] = value
    return yaml.safe_dump(cfg)


def test_model_pretrained(shards, teacher_file, tmp_path):
    marker = tmp_path / "MARKER"
    bomb = write_bomb(tmp_path / "videomamba_t16.pth", marker)
    done = run_cli(stage_args(shards, teacher_file, tmp_path / "run", 2, [f"model.pretrained={bomb}"]))
    refused(done, marker, bomb)


@pytest.mark.parametrize("as_folder", [False, True], ids=["file", "run-folder"])
def test_distill_checkpoint(shards, teacher_file, tmp_path, as_folder):
    marker = tmp_path / "MARKER"
    if as_folder:
        write_bomb_run(tmp_path / "guide", marker, hostile="deepspeed/mp_rank_00_model_states.pt")
        source, named = tmp_path / "guide", "mp_rank_00_model_states.pt"
    else:
        source = named = write_bomb(tmp_path / "guide.pth", marker)
    done = run_cli(stage_args(shards, teacher_file, tmp_path / "run", 2,
                              ["distill.enabled=true", f"distill.checkpoint={source}"]))
    refused(done, marker, named)


def test_stage2_init(shards, teacher_file, tmp_path, tiny_bert_dir):
    marker = tmp_path / "MARKER"
    step = write_bomb_run(tmp_path / "stage1", marker, hostile="deepspeed/mp_rank_00_model_states.pt")
    args = ["pretrain", "--config", str(REPO / "configs" / "stage2_video_text.yaml"), f"init={tmp_path / 'stage1'}",
            f"data.train={shards}", "teacher.model=stage-test-vit", f"teacher.pretrained={teacher_file}",
            "teacher.img_size=64", "data.img_size=64", "data.num_frames=4", "train.max_steps=2",
            "train.batch_size=4", f"train.out={tmp_path / 'run'}", "train.progress=false"]
    done = run_cli(args + [f"{k}={v}" for k, v in TINY_STAGE2.items()] + [f"text.pretrained={tiny_bert_dir}"])
    refused(done, marker, step / "deepspeed" / "mp_rank_00_model_states.pt")


@pytest.mark.parametrize("hostile", ["trainer_state.pt", "rank_00000.pt", "deepspeed/mp_rank_00_model_states.pt"])
def test_resume(shards, teacher_file, tmp_path, hostile):
    marker = tmp_path / "MARKER"
    run = tmp_path / "run"
    step = write_bomb_run(run, marker, hostile=hostile)
    done = run_cli(stage_args(shards, teacher_file, run, 2) + ["--resume", str(run)])
    refused(done, marker, step / hostile)


def test_eval_checkpoint_run_folder(synth_corpus, tmp_path, tiny_bert_dir):
    marker = tmp_path / "MARKER"
    step = write_bomb_run(tmp_path / "stage2", marker, hostile="deepspeed/mp_rank_00_model_states.pt",
                          config=stage2_config_yaml(tiny_bert_dir))
    done = run_cli(["eval", "--config", str(REPO / "configs" / "eval_retrieval.yaml"), "--checkpoint",
                    str(tmp_path / "stage2"), "--dataset", "msrvtt", "--annotations",
                    str(synth_corpus / "eval" / "msrvtt_test.json"), "--videos", str(synth_corpus / "eval" / "videos"),
                    "--out", str(tmp_path / "eval"), "model.kind=videomamba", "data.num_frames=4", "data.img_size=32"])
    refused(done, marker, step / "deepspeed" / "mp_rank_00_model_states.pt")

"""What the stages share: the Ray Train workers' config with absolute paths, and the registry by name."""
from pipeline.config import AlignStageConfig, VideoTextStageConfig, load_config
from pipeline.stages.base import with_absolute_paths
from pipeline.stages.pretrain import STAGES


def test_the_registry_finds_each_stage_by_name_with_its_config_class():
    assert {name: stage.config for name, stage in STAGES.items()} == {"align": AlignStageConfig,
                                                                      "video_text": VideoTextStageConfig}
    assert all(stage.name == name and stage.train.__module__ == f"pipeline.stages.{name}"
               for name, stage in STAGES.items())


def test_ray_workers_get_absolute_paths_but_urls_and_pretrained_tags_stay(tmp_path, monkeypatch):
    """Ray Train starts each worker in its trial folder: relative paths must be made absolute before they ship."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s1").mkdir()
    cfg = load_config(VideoTextStageConfig, None, ["train.out=runs/s2", "init=s1", "teacher.pretrained=openai",
                                                   "data.train=shards/{000..003}.tar,s3://bucket/index.json"])
    fixed = with_absolute_paths(cfg)
    assert fixed.train.out == str(tmp_path / "runs" / "s2") and fixed.init == str(tmp_path / "s1")
    assert fixed.teacher.pretrained == "openai"
    assert fixed.data.train == f"{tmp_path}/shards/{{000..003}}.tar,s3://bucket/index.json"
    assert cfg.train.out == "runs/s2"  # the caller's config is left as it was

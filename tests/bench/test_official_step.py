"""bench/official_step.py on the CPU: the carried tree's file list, the command line, and the three official parts
run end to end with the official repository's reference ops standing in for its CUDA kernels (--emulate-kernels,
tiny widths), which exercises the imports, the shims for transformers 5 and newer torch, the configs and the steps."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.official_step import REQUIRED, missing_files

REPO = Path(__file__).resolve().parents[2]
MIRROR = os.environ.get("OFFICIAL_GIT", "/work/.mirror/OpenGVLab+VideoMamba/repo")
PATCH = Path("/work/shared/gpu/official-videomamba-sm90.patch")


def bench(*args, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "bench.official_step", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def official_tree(tmp_path_factory):
    """The official tree as bench/pack_official.sh packs it and the device call unpacks it (from the local mirror)."""
    if not os.path.isdir(MIRROR) or not PATCH.is_file():
        pytest.skip("no local mirror of OpenGVLab/VideoMamba or no sm_90 patch here")
    work = tmp_path_factory.mktemp("pack")
    env = {**os.environ, "OFFICIAL_GIT": MIRROR, "OFFICIAL_PATCH": str(PATCH)}
    for name in ("bench", ".gitignore"):
        (work / name).symlink_to(REPO / name) if name == "bench" else (work / name).write_text("")
    subprocess.run(["bash", "bench/pack_official.sh"], cwd=work, env=env, check=True, capture_output=True)
    tree = work / "tree"
    tree.mkdir()
    subprocess.run(["tar", "xzf", str(work / ".official" / "official.tar.gz"), "-C", str(tree)], check=True)
    subprocess.run(["patch", "-p1", "--quiet", "-i", str(work / ".official" / PATCH.name)], cwd=tree, check=True)
    assert (work / ".official" / "official.tar.gz").stat().st_size < 16 * 2 ** 20  # well inside a call's carry
    return str(tree)


def test_help_and_a_tree_without_the_files():
    assert bench("--help").returncode == 0
    proc = bench("--official", "/nonexistent", "--check")
    assert proc.returncode == 2 and "videomamba/video_mm/models/backbones/bert/xbert.py" in proc.stderr
    assert missing_files("/nonexistent", ["backbone"]) == REQUIRED["common"] + REQUIRED["backbone"]


def test_the_packed_tree_holds_every_imported_file(official_tree):
    assert missing_files(official_tree) == []
    assert bench("--official", official_tree, "--check").returncode == 0


def test_every_official_part_runs_with_emulated_kernels(official_tree, tmp_path):
    out = tmp_path / "official.json"
    proc = bench("--official", official_tree, "--size", "test", "--emulate-kernels", "--steps", "1", "--warmup",
                 "1", "--profile-steps", "0", "--batch1", "2", "--batch2", "2", "--backbone-batch", "2",
                 "--part", "backbone", "stage1", "stage2", "stage2_vision", "--json", str(out))
    record = json.loads(out.read_text())
    for name in ("backbone", "stage1", "stage2", "stage2_vision"):  # the last: what runs if the text side cannot
        part = record["parts"][name]
        assert part["ok"], (name, part.get("error"), part.get("traceback"))
        assert part["step_ms"] > 0 and part["clips_per_s"] > 0 and part["batch"] == 2
    stage2 = record["parts"]["stage2"]
    shims = {s["shim"] for s in stage2["shims"]}
    assert {"xbert init_weights -> post_init", "clip_b16 weights file", "build_bert without from_pretrained",
            "CUDA indices into CPU masks: .cpu()"} <= shims
    assert stage2["gradient_checkpointing"] and stage2["bert_config_gradient_checkpointing"]
    assert proc.returncode == 0 and "| stage2 | 2 |" in proc.stdout

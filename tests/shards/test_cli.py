"""`videomamba shard`: help, exit status for bad command lines, and a run killed mid-way then resumed."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_help_explains_the_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["shard", "--help"])
    text = capsys.readouterr().out
    assert e.value.code == 0
    for needle in ("--input", "--out", "--samples-per-shard", "--ray-address", "--workers", "--media-column",
                   "--caption-column", "index.json", "failures.jsonl", "summary.json", "sha256", "s3://",
                   "--short-side", "--retries", "started again", "Exit status"):
        assert needle in text, needle


def test_bad_command_lines_exit_2_and_name_the_problem(tmp_path, capsys):
    missing = tmp_path / "nope.csv"
    assert main(["shard", "--input", str(missing), "--out", str(tmp_path / "o")]) == 2
    assert str(missing) in capsys.readouterr().err
    (tmp_path / "m.csv").write_text("clip,caption\na.mp4,hello\n")
    assert main(["shard", "--input", str(tmp_path / "m.csv"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "m.csv" in err and "clip, caption" in err and "--media-column" in err
    assert main(["shard", "--input", str(tmp_path / "m.csv"), "--out", str(tmp_path / "o"),
                 "--media-column", "clip", "--samples-per-shard", "0"]) == 2
    assert "--samples-per-shard" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["shard", "--input", str(tmp_path / "m.csv")])
    assert e.value.code == 2


def test_a_ray_address_where_nothing_listens_exits_2_at_once(tmp_path, capsys):
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "m.csv").write_text("video,caption\na.mp4,hello\n")
    args = ["shard", "--input", str(tmp_path / "m.csv"), "--out", str(tmp_path / "o"), "--ray-address"]
    assert main(args + [f"127.0.0.1:{port}"]) == 2
    assert f"--ray-address 127.0.0.1:{port}: nothing answers there" in capsys.readouterr().err
    assert main(args + ["head-node"]) == 2
    assert "expected auto or HOST:PORT" in capsys.readouterr().err


def write_corpus(root: Path, make_mp4, videos: int) -> Path:
    rows = []
    for i in range(videos):
        make_mp4(root / "videos" / f"v{i}.mp4", frames=16, size=64)
        rows.append({"key": f"v{i}", "path": f"videos/v{i}.mp4", "caption": f"clip number {i}"})
    rows.insert(3, {"key": "gone", "path": "videos/gone.mp4", "caption": "never written"})
    (root / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "m.jsonl"


def shard_command(manifest: Path, out: Path) -> list[str]:
    # re-encoding makes each one-sample shard take a while, so the kill lands mid-run
    return [sys.executable, "-m", "pipeline.cli", "shard", "--input", str(manifest), "--out", str(out),
            "--samples-per-shard", "1", "--workers", "1", "--short-side", "32", "--retries", "0"]


def kill_session(sid: int) -> None:
    """SIGKILLs every process of session `sid` (the killed job's Ray processes do not all die with its group)."""
    for _ in range(3):
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit() and _session(p) == sid]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if not pids:
            return
        time.sleep(0.2)


def _session(pid: str) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[4])
    except (OSError, IndexError, ValueError):
        return -1


def test_killed_run_resumes_to_the_same_shards_and_index(tmp_path, make_mp4):
    manifest = write_corpus(tmp_path / "corpus", make_mp4, videos=20)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    job = subprocess.Popen(shard_command(manifest, out), cwd=ROOT, env=env, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (out.is_dir() and any(f.endswith(".json") for f in os.listdir(out))):
            assert job.poll() is None and time.monotonic() < deadline, "the job ended before writing a shard"
            time.sleep(0.005)
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
        kill_session(job.pid)
    done_before = sorted(f for f in os.listdir(out) if f.startswith("shard-") and f.endswith(".json"))
    assert not (out / "index.json").exists() and 1 <= len(done_before) < 21, "the kill did not land mid-run"

    resumed = subprocess.run(shard_command(manifest, out), cwd=ROOT, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    reference = subprocess.run(shard_command(manifest, tmp_path / "ref"), cwd=ROOT, env=env, capture_output=True,
                               text=True)
    assert reference.returncode == 0, reference.stderr

    summary = json.loads((out / "summary.json").read_text())
    assert summary["shards_skipped"] >= len(done_before) and summary["shards_written"] == 21 - summary["shards_skipped"]
    assert f"{summary['shards_skipped']} reused from an earlier run" in resumed.stdout
    for name in ("index.json", "failures.jsonl"):
        assert (out / name).read_text() == (tmp_path / "ref" / name).read_text()
    index = json.loads((out / "index.json").read_text())
    assert index["samples"] == 20 and len(index["shards"]) == 21
    reasons = [json.loads(line)["reason"] for line in (out / "failures.jsonl").read_text().splitlines()]
    assert reasons == ["missing_file"]
    assert sorted(os.listdir(out)) == sorted(os.listdir(tmp_path / "ref"))  # no temporaries left over

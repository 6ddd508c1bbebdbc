"""`videomamba shard --ray-address HOST:PORT` on a running 2-node cluster (ray.cluster_utils.Cluster, 1 CPU each):
the job joins it, its tasks run on both nodes, and the cluster is left running."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def two_nodes():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


def test_tasks_spread_over_both_nodes(two_nodes, tmp_path, make_mp4):
    rows = []
    for i in range(8):
        make_mp4(tmp_path / "videos" / f"v{i}.mp4", frames=8, size=32)
        rows.append({"path": f"videos/v{i}.mp4", "text": f"clip {i}"})
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cmd = [sys.executable, "-m", "pipeline.cli", "shard", "--input", str(tmp_path / "m.jsonl"),
           "--out", str(tmp_path / "out"), "--samples-per-shard", "1", "--ray-address", two_nodes.address]
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["samples"] == 8 and summary["workers"] == 2  # the joined cluster's CPUs
    node_ids = {n.node_id for n in two_nodes.list_all_nodes()}
    assert set(summary["nodes"]) == node_ids and len(node_ids) == 2
    assert "on 2 node(s)" in done.stdout
    assert two_nodes.head_node.remaining_processes_alive()  # the job left the cluster it joined running

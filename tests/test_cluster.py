"""pipeline.cluster and the run's checks on its cluster: the run folder must be visible on every node."""
import pytest

from pipeline.errors import ConfigError


@pytest.fixture(scope="module")
def local_ray():
    from pipeline.cluster import ray_connection

    with ray_connection(None, 1):
        yield


def test_a_folder_every_node_sees_passes_and_a_missing_one_names_the_node(local_ray, tmp_path):
    import ray

    from pipeline.cluster import nodes_not_seeing

    assert nodes_not_seeing(str(tmp_path)) == []
    blind = nodes_not_seeing(str(tmp_path / "not-mounted-here"))
    assert blind == [node["NodeManagerAddress"] for node in ray.nodes() if node["Alive"]] and blind


def test_the_run_refuses_a_run_folder_no_node_sees(local_ray, tmp_path, monkeypatch):
    from pipeline import orchestrate

    # The driver sees a folder the nodes do not: a run folder on the driver's local disk of a multi-node cluster.
    monkeypatch.setattr("pipeline.cluster.nodes_not_seeing", lambda path: ["10.0.0.7"])
    cluster = orchestrate.Cluster(None, str(tmp_path))
    with pytest.raises(ConfigError, match=r"not visible on the Ray node\(s\) 10.0.0.7"):
        cluster.connect()


def test_an_object_store_url_as_run_folder_is_refused_before_any_work(tmp_path, capsys):
    from pipeline.cli import main

    assert main(["run", "--config", "configs/recipes/demo.yaml", "--out", "s3://bucket/run"]) == 2
    assert "--out s3://bucket/run: the run folder must be a path on a file system every node shares" in \
        capsys.readouterr().err

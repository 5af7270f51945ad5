"""Two Ray nodes on this machine (ray.cluster_utils.Cluster, every address on
127.0.0.1): training workers spread over both, and a run that loses the
worker node mid-epoch finishes on the head with at most that epoch lost."""

import threading
import time

import pytest

from runner.config import load_job
from runner.growth.loop import grow
from test_resilience import (EPOCHS, cpus_all_free, reported_epochs,
                             restart_point, settings, wait_for)


@pytest.fixture
def two_nodes():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": True})
    worker = cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address, logging_level="WARNING")
    cluster.wait_for_nodes()
    assert [n["NodeManagerAddress"] for n in ray.nodes()] == ["127.0.0.1"] * 2
    yield ray, cluster, worker
    ray.shutdown()
    cluster.shutdown()


def training_worker_nodes(ray) -> set[str]:
    from ray.util.state import list_actors
    return {a.node_id for a in list_actors(filters=[
        ("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])}


def test_losing_the_worker_node_costs_at_most_the_epoch_in_flight(
        tmp_path, cats_dogs_subset, two_nodes):
    ray, cluster, worker = two_nodes
    root = tmp_path / "run"
    # Small enough to fit on the head alone once the worker node is gone.
    job = load_job("jobs/cats_dogs.yaml", settings(root, cats_dogs_subset) + [
        "train.workers=2", "train.cpus_per_worker=0.5", "augment.cpus=0.5"])
    seen = {}

    def remove_worker_node_mid_epoch():
        def first_epoch():
            """the first epoch's report"""
            return reported_epochs(root) >= 1
        wait_for(first_epoch)
        seen["nodes"] = training_worker_nodes(ray)
        time.sleep(1.0)  # into the next epoch
        seen["newest"] = reported_epochs(root)
        cluster.remove_node(worker, allow_graceful=False)

    killer = threading.Thread(target=remove_worker_node_mid_epoch)
    killer.start()
    lineage = grow(job)
    killer.join()

    assert seen["nodes"] == {n["NodeID"] for n in ray.nodes()}, \
        "training workers were not spread over both nodes"
    assert seen["newest"] < EPOCHS, "the node went after the last epoch"
    assert len([n for n in ray.nodes() if n["Alive"]]) == 1
    assert lineage["finished"]
    trial = lineage["stages"][0]["trials"][0]
    assert trial["status"] == "done" and trial["restarts"] == 1
    assert restart_point(trial) >= seen["newest"]
    cpus_all_free(ray)

"""A stage whose every trial fails: the run stops with the cause in one line
and keeps the stages before it. The failure is real (an exception inside each
trial's Ray worker), injected with Ray's own per-worker setup hook, because a
job file that cannot grow is now refused before anything runs."""

import json
import sys
from pathlib import Path

import pytest
from ray import cloudpickle

from runner.config import load_job
from runner.growth.loop import grow


def _break_growing():
    """Runs in every Ray worker process as it starts: growing a child by
    ``widen_conv`` raises (loading the first stage's weights still works)."""
    from runner.growth import stage

    prepare = stage._prepare_child

    def fail_to_widen(variant, *args, **kwargs):
        if variant["op"] == "widen_conv":
            raise RuntimeError("growing failed on purpose")
        return prepare(variant, *args, **kwargs)

    stage._prepare_child = fail_to_widen


@pytest.fixture(scope="module")
def ray_failing_growth():
    import ray

    # By value: the workers cannot import this test module.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, logging_level="WARNING",
             runtime_env={"worker_process_setup_hook": _break_growing})
    yield ray
    ray.shutdown()
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def test_a_run_starts_from_a_given_checkpoint_and_a_failed_stage_keeps_the_rest(
        tmp_path, cats_dogs_subset, ray_failing_growth):
    """Stage 1 starts from a checkpoint (as `runner import-keras` writes one)
    instead of random weights; stage 2 fails, and stage 1 stays recorded."""
    import torch

    from runner.errors import RunnerError
    from runner.model import build_model, classifier_1, load_checkpoint, save_checkpoint

    torch.manual_seed(7)
    given = build_model(classifier_1()).state_dict()
    save_checkpoint(tmp_path / "imported", classifier_1(), given, {"epoch": 0})
    root = tmp_path / "run"
    job = load_job("jobs/cats_dogs.yaml", [
        f"storage={root}", f"data.root={cats_dogs_subset}",
        "train.batch_size=16", "stages.0.epochs=1", "baseline=false",
        "stages.0.model=null", f"stages.0.init={tmp_path / 'imported'}",
        "stages.1.variants=[{op: widen_conv, block: 0, layer: 0, filters: 64}]",
        "stages.2.variants=[{op: widen_dense, index: 0, units: 160}]"])
    with pytest.raises(RunnerError, match="every trial failed") as failed:
        grow(job)
    # The cause in one clean line, not Ray's wrapper around it.
    message = str(failed.value)
    assert "growing failed on purpose" in message, message
    assert "\n" not in message and "\x1b" not in message and "ray::" not in message
    lineage = json.loads((root / "lineage.json").read_text())
    assert [s["name"] for s in lineage["stages"]] == ["seed"]
    assert not lineage["finished"]
    (seed,) = lineage["stages"][0]["trials"]
    assert seed["variant"] == {"op": "load", "checkpoint": str(tmp_path / "imported")}
    _, start, meta = load_checkpoint(root / "seed" / "init" / seed["name"])
    assert all(start[k].equal(given[k]) for k in given)
    assert meta["source"] == str(tmp_path / "imported")
    ckpt = Path(lineage["stages"][0]["checkpoint"])
    assert (ckpt / "model.pt").exists()

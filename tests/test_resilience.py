"""Failures done for real on a real local Ray: a training worker SIGKILLed mid
epoch, the driver SIGKILLed mid stage (and its newest checkpoint truncated
before the rerun), a damaged lineage.json. Each run must end with a complete
lineage, lose at most the epoch in flight, and score like an uninterrupted run
of the same seed (within the noise of 40 test images)."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from runner.config import load_job
from runner.growth.loop import grow

EPOCHS = 3
ACCURACY_NOISE = 0.2  # 40 test images, a model trained for 3 short epochs


def settings(root, data, views=6) -> list[str]:
    """One stage, classifier_2 from scratch, epochs long enough to be hit
    in the middle (6 augmented views of the 72 training images)."""
    return [f"storage={root}", f"data.root={data}", "train.batch_size=16",
            f"augment.views_per_epoch={views}", "baseline=false",
            f"stages=[{{name: seed, model: classifier_2, epochs: {EPOCHS}}}]"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cats_dogs_subset, ray_local):
    root = tmp_path_factory.mktemp("reference")
    return grow(load_job("jobs/cats_dogs.yaml", settings(root, cats_dogs_subset)))


def reported_epochs(root: Path) -> int:
    """Epochs the driver has been told of (live.json): by then Ray Train has
    registered the epoch's checkpoint, so a restart goes on from it."""
    try:
        trials = json.loads((root / "live.json").read_text())["trials"]
    except (OSError, ValueError, KeyError):
        return 0
    return max((len(t["epochs"]) for t in trials), default=0)


def checkpoints(root: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in
                  root.glob("seed/train/*/epoch-*/model.pt"))


def cpus_all_free(ray, timeout=60.0):
    """A finished run gives back every CPU it held (no placement group of a
    dead worker or trial left behind)."""
    def free():
        """all CPUs free"""
        return ray.available_resources().get("CPU", 0) == \
            ray.cluster_resources().get("CPU")
    wait_for(free, timeout)


def wait_for(condition, timeout=180.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"gave up waiting for {condition.__doc__}")


def training_workers() -> list[int]:
    """PIDs of Ray Train worker processes (Ray titles them ray::RayTrainWorker)."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if b"RayTrainWorker" in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def restart_point(trial: dict) -> int:
    """Each epoch reported once, and one restart: the number of epochs done
    before it (the checkpoint the restarted workers went on from)."""
    epochs = trial["epochs"]
    assert [e["epoch"] for e in epochs] == list(range(1, EPOCHS + 1))
    restarts = [e["restarts"] for e in epochs]
    done = restarts.count(0)
    assert restarts == [0] * done + [1] * (EPOCHS - done)
    assert done < EPOCHS, "no epoch after the restart"
    return done


def test_a_killed_training_worker_is_replaced_and_the_stage_completes(
        tmp_path, cats_dogs_subset, ray_local, reference):
    root = tmp_path / "run"
    killed = {}

    def kill_one_worker_mid_epoch():
        def first_epoch():
            """the first epoch's report"""
            return reported_epochs(root) >= 1
        wait_for(first_epoch)
        time.sleep(1.0)  # into the next epoch
        killed["newest"] = reported_epochs(root)
        killed["pid"] = training_workers()[0]
        os.kill(killed["pid"], signal.SIGKILL)

    killer = threading.Thread(target=kill_one_worker_mid_epoch)
    killer.start()
    lineage = grow(load_job("jobs/cats_dogs.yaml", settings(root, cats_dogs_subset)))
    killer.join()
    cpus_all_free(ray_local)

    assert killed["newest"] < EPOCHS, "the kill came after the last epoch"
    assert killed["pid"] not in training_workers()
    assert lineage["finished"]
    trial = lineage["stages"][0]["trials"][0]
    assert trial["status"] == "done" and trial["restarts"] == 1
    # It went on from the newest checkpoint there was when the worker died
    # (at least the one the driver had heard of): only that epoch was lost.
    assert restart_point(trial) >= killed["newest"]
    assert abs(lineage["stages"][0]["test"]["accuracy"] -
               reference["stages"][0]["test"]["accuracy"]) <= ACCURACY_NOISE


def test_a_killed_driver_resumes_from_the_last_intact_checkpoint(
        tmp_path, cats_dogs_subset, ray_local, reference):
    """SIGKILL `runner grow` after its first epoch, truncate the newest
    checkpoint its workers wrote before Ray stopped them, run the same command
    again: it goes on from the checkpoint before that one."""
    root = tmp_path / "run"
    job_file = tmp_path / "job.yaml"
    # Longer epochs: Ray stops the workers of a killed driver only after a
    # few seconds, and the last epoch must not be done by then.
    job = load_job("jobs/cats_dogs.yaml", settings(root, cats_dogs_subset, views=15))
    job_file.write_text(yaml.safe_dump(job.to_dict()))
    command = [sys.executable, "-m", "runner.cli", "grow", str(job_file)]
    env = dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)

    log = tmp_path / "driver.log"
    with log.open("w") as out:
        driver = subprocess.Popen(command, env=env, stdout=out, stderr=out)

    def one_epoch():
        """the first epoch's report"""
        assert driver.poll() is None, log.read_text()[-3000:]
        return reported_epochs(root) >= 1
    wait_for(one_epoch)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    newest = max(checkpoints(root))
    assert newest < EPOCHS, "the kill came after the last epoch"
    damaged = next(root.glob(f"seed/train/*/epoch-{newest:03d}/model.pt"))
    damaged.write_bytes(damaged.read_bytes()[:4096])

    rerun = subprocess.run(command, env=env, capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    lineage = json.loads((root / "lineage.json").read_text())
    assert lineage["finished"]
    trial = lineage["stages"][0]["trials"][0]
    assert trial["restarts"] == 1
    # Epoch `newest` was lost with its checkpoint and trained again (from the
    # first weights if it was the first); the lineage keeps its second run.
    assert restart_point(trial) == newest - 1
    assert abs(lineage["stages"][0]["test"]["accuracy"] -
               reference["stages"][0]["test"]["accuracy"]) <= ACCURACY_NOISE


def test_a_damaged_lineage_is_rebuilt_from_the_stage_results(
        tmp_path, cats_dogs_subset, ray_local, reference):
    root = Path(reference["storage"])
    path = root / "lineage.json"
    path.write_text(path.read_text()[:200])
    before = checkpoints(root)
    lineage = grow(load_job("jobs/cats_dogs.yaml", settings(root, cats_dogs_subset)))
    assert lineage["finished"]
    assert lineage["stages"][0]["winner"] == reference["stages"][0]["winner"]
    assert lineage["stages"][0]["checkpoint"] == reference["stages"][0]["checkpoint"]
    assert checkpoints(root) == before  # nothing trained again
    assert [p.name for p in root.glob("lineage.json.damaged-*")]

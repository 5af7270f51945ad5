"""The multi-stage driver: ingest, then stage after stage, each from the last
winner, recording everything in ``lineage.json``.

``lineage.json`` (written atomically after every stage)::

    {"run", "storage", "job", "data": {counts, skipped...},
     "stages": [{"index", "name", "parent", "trials": [trial records],
                 "winner", "checkpoint", "val_acc", "test", "compute",
                 "path_compute"}],
     "baseline": {same as a stage, plus "budget_flops"},
     "verdict": {"baseline_best_val_acc", "baseline_flops", "growth_best_val_acc",
                 "growth_flops_to_match", "fraction", "text"},
     "finished": bool}

A stage already in the lineage is not run again, so rerunning the same
command after an interruption continues where the run stopped (a stage cut
short mid-way resumes inside Tune, see ``runner.growth.stage``).
"""

from __future__ import annotations

import logging
import math
import tempfile
import time

import yaml

from runner import storage
from runner.config import JobConfig, StageConfig
from runner.data.ingest import ingest, summary
from runner.errors import RunnerError
from runner.evaluate import evaluate_checkpoint
from runner.growth.variants import select_winner, verdict
from runner.model import train_flops_per_image
from runner.model.checkpoint import load_checkpoint
from runner.report import format_report

log = logging.getLogger(__name__)

LINEAGE = "lineage.json"


def shards_location(job: JobConfig, root: storage.Location) -> storage.Location:
    return storage.resolve(job.data.shards) if job.data.shards else root.join("data")


def prepare(job: JobConfig) -> tuple[storage.Location, dict]:
    """Everything that can fail on bad input, before any cluster work:
    the storage root must be writable and the data must ingest."""
    root = storage.resolve(job.storage)
    storage.check_writable(root)
    shards = shards_location(job, root)
    manifest = ingest(job.data.root, shards, base_size=job.data.base_size)
    log.info("data: %s", summary(manifest))
    manifest = dict(manifest, location=shards.uri)
    storage.write_bytes(root.join("job.yaml"),
                        yaml.safe_dump(job.to_dict(), sort_keys=False).encode())
    return root, manifest


def grow(job: JobConfig) -> dict:
    """Run every stage of ``job`` (resuming a partial run) and return the
    lineage."""
    from runner import cluster, resources
    from runner.growth.stage import run_stage

    root, manifest = prepare(job)
    plan = resources.plan(job, cluster.connect(job))
    log.info("each trial: %d training workers x %g CPUs (%d threads), "
             "%g CPUs of augmentation", plan.workers, plan.cpus_per_worker,
             plan.threads_per_worker, plan.aug_cpus)
    lineage = _load_or_start(job, root, manifest)
    done = {s["name"] for s in lineage["stages"]}
    for index, stage in enumerate(job.stages):
        if stage.name in done:
            log.info("stage %d (%s) already done, skipping", index + 1, stage.name)
            continue
        log.info("stage %d/%d (%s): %d epochs per trial", index + 1,
                 len(job.stages), stage.name, stage.epochs)
        parent = _parent(lineage)
        t0 = time.time()
        trials = run_stage(job, stage, index == 0, parent, manifest, plan, root)
        record = _stage_record(index, stage.name, parent, trials, manifest, job,
                               lineage)
        record["driver_wall_s"] = time.time() - t0
        lineage["stages"].append(record)
        storage.write_json(root.join(LINEAGE), lineage)
        _log_winner(record)
    if job.baseline and not lineage.get("baseline"):
        _run_baseline(job, lineage, manifest, plan, root, run_stage)
    lineage["finished"] = True
    storage.write_json(root.join(LINEAGE), lineage)
    print(format_report(lineage))
    return lineage


def _log_winner(record: dict) -> None:
    log.info("stage %s winner %s: val_acc %.4f test_acc %.4f; checkpoint %s",
             record["name"], record["winner"], record["val_acc"],
             record["test"]["accuracy"], record["checkpoint"])


def baseline_stage(job: JobConfig, lineage: dict, manifest: dict) -> StageConfig:
    """The final architecture from scratch, allowed the growth path's FLOPs
    (a trial stops at the first epoch end past its budget)."""
    final = lineage["stages"][-1]
    with tempfile.TemporaryDirectory() as tmp:
        spec, _, _ = load_checkpoint(storage.download_dir(
            storage.resolve(final["checkpoint"]), tmp))
    budget = final["path_compute"]["flops"]
    train_images = sum(manifest["counts"]["train"].values()) * \
        (1 - job.data.val_fraction) * job.augment.views_per_epoch
    epochs = math.ceil(budget / (train_flops_per_image(spec) * train_images)) + 1
    return StageConfig(name="baseline", epochs=epochs, model=spec.to_dict(),
                       budget={"flops": budget})


def _run_baseline(job, lineage, manifest, plan, root, run_stage) -> None:
    stage = baseline_stage(job, lineage, manifest)
    log.info("baseline: %s from scratch, budget %.2f TFLOP (up to %d epochs)",
             stage.model["name"], stage.budget["flops"] / 1e12, stage.epochs)
    trials = run_stage(job, stage, True, None, manifest, plan, root)
    record = _stage_record(len(job.stages), "baseline", None, trials, manifest, job,
                           {"stages": []})
    record["budget_flops"] = stage.budget["flops"]
    lineage["baseline"] = record
    lineage["verdict"] = verdict(lineage["stages"], record)
    storage.write_json(root.join(LINEAGE), lineage)
    _log_winner(record)
    log.info("verdict: %s", lineage["verdict"]["text"])


def _load_or_start(job: JobConfig, root: storage.Location, manifest: dict) -> dict:
    path = root.join(LINEAGE)
    if storage.exists(path):
        lineage = storage.read_json(path)
        if [s["name"] for s in lineage["stages"]] != \
                [s.name for s in job.stages][:len(lineage["stages"])]:
            raise RunnerError(
                f"{path.uri} holds a run with other stages; use another storage "
                "root or remove that run")
        return lineage
    data = {k: manifest[k] for k in ("counts", "classes", "base_size", "location")}
    data["skipped"] = len(manifest.get("skipped", []))
    return {"run": job.name, "storage": root.uri, "job": job.to_dict(),
            "data": data, "stages": [], "finished": False}


def _parent(lineage: dict) -> dict | None:
    if not lineage["stages"]:
        return None
    last = lineage["stages"][-1]
    return {"stage": last["name"], "trial": last["winner"],
            "checkpoint": last["checkpoint"]}


def _stage_record(index: int, name: str, parent, trials: list[dict], manifest: dict,
                  job: JobConfig, lineage: dict) -> dict:
    failed = [t for t in trials if not t.get("epochs")]
    if len(failed) == len(trials):
        errors = "; ".join(f"{t['name']}: {t['error']}" for t in trials)
        raise RunnerError(f"stage {name}: every trial failed ({errors})")
    winner = select_winner(trials)
    test = evaluate_checkpoint(winner["best"]["checkpoint"], manifest, "test",
                               job.data.image_size)
    spent = {k: sum(t.get("compute", {}).get(k, 0.0) for t in trials)
             for k in ("flops", "cpu_s", "wall_s")}
    before = lineage["stages"][-1]["path_compute"] if lineage["stages"] else \
        dict.fromkeys(spent, 0.0)
    # The path to the winner costs everything its ancestors spent plus the
    # winner's own training; the losing trials are the price of the search.
    path = {k: before[k] + winner["compute"][k] for k in spent}
    return {"index": index + 1, "name": name, "parent": parent, "trials": trials,
            "winner": winner["name"], "checkpoint": winner["best"]["checkpoint"],
            "val_acc": winner["best"]["val_acc"], "test": test,
            "compute": spent, "path_compute": path}

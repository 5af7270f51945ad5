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

import json
import logging
import math
import tempfile
import time

import yaml

from runner import storage
from runner.config import JobConfig, StageConfig, blame_file, with_defaults
from runner.data.ingest import ingest
from runner.errors import RunnerError
from runner.evaluate import evaluate_checkpoint
from runner.growth.progress import LIVE, Progress
from runner.growth.variants import select_winner, stage_children, stage_trials, verdict
from runner.model import ModelSpec, get_spec, train_flops_per_image
from runner.model.checkpoint import load_checkpoint
from runner.report import format_report
from runner.train import precision

log = logging.getLogger(__name__)

LINEAGE = "lineage.json"
JOB_FILE = "job.yaml"
# Settings a run may be resumed with changed (see check_resume).
RESUME_MAY_CHANGE = ("storage", "ray.address")
SHOWN_CHANGES = 6  # differing settings a refused resume names, at most
_NOT_SET = object()  # a key or list item one job has and the other lacks


def shards_location(job: JobConfig, root: storage.Location) -> storage.Location:
    return storage.resolve(job.data.shards) if job.data.shards else root.join("data")


def prepare(job: JobConfig) -> tuple[storage.Location, dict]:
    """Everything that can fail on bad input, before any cluster work:
    every stage's variants must build (from the first stage's spec or its
    ``init:`` checkpoint, which must load) and a run already in the storage
    root must have been started by the same job, all before anything is
    written; then the storage root must be writable and the data must
    ingest."""
    check_growth(job)
    check_resume(job)
    check_local_plan(job)
    root = storage.resolve(job.storage)
    storage.check_writable(root)
    shards = shards_location(job, root)
    manifest = ingest(job.data.root, shards, base_size=job.data.base_size)
    manifest = dict(manifest, location=shards.uri)
    return root, manifest


def check_local_plan(job: JobConfig) -> None:
    """With no cluster to join, the run will start a local Ray of
    ``ray.num_cpus`` (or all) CPUs: a CPU plan that cannot fit it is refused
    now, not after the ingest and Ray's start. (A cluster's CPUs are known
    only once joined; :func:`grow` checks the plan again there.)"""
    import ray

    from runner import cluster, resources
    if ray.is_initialized() or cluster.find_address(job.ray.address):
        return
    resources.plan(job, cluster.local_cpus(job), 1)


def check_growth(job: JobConfig, first_spec: ModelSpec | None = None) -> None:
    """Build every stage on paper (see ``variants.stage_children``) from the
    first stage's model: ``first_spec`` when the caller has it already, else
    a spec name or file that must exist, or the spec of its ``init:``
    checkpoint. Errors name the setting, and the job file when the file holds
    the mistake (not only a --set override)."""
    try:
        _grow_on_paper(job, first_spec)
    except RunnerError as err:
        raise blame_file(job, err, lambda j: _grow_on_paper(j, first_spec)) from err


def _grow_on_paper(job: JobConfig, spec: ModelSpec | None = None) -> None:
    first = job.stages[0]
    spec = spec or _first_spec(first)
    if spec.input_size != job.data.image_size:
        raise RunnerError(
            f"data.image_size {job.data.image_size} does not fit stages[0] "
            f"({first.name}): {spec.name} takes {spec.input_size}x{spec.input_size} "
            "images; set data.image_size to that, or start from a model of that size")
    stage_children(job.stages, spec, job.seed)


def _first_spec(first: StageConfig) -> ModelSpec:
    """The first stage's model: its ``init:`` checkpoint's spec, else its
    ``model:`` spec name or file."""
    if first.init:
        return check_init(first.init)
    try:
        return get_spec(first.model)
    except RunnerError as err:
        raise RunnerError(f"stages[0] ({first.name}).model: {err}") from err


def check_init(checkpoint: str):
    """The first stage's ``init:`` checkpoint must exist, verify and fit its
    own spec; found out here, not in a trial after the cluster is up.
    Returns its spec."""
    from runner.evaluate import load_model

    try:
        with tempfile.TemporaryDirectory() as tmp:
            spec, state, _ = load_checkpoint(storage.download_dir(
                storage.resolve(checkpoint), tmp))
        load_model(spec, state, checkpoint)
    except (RunnerError, OSError) as err:
        raise RunnerError(f"stages[0].init {checkpoint}: {err}") from None
    return spec


def grow(job: JobConfig) -> dict:
    """Run every stage of ``job`` (resuming a partial run) and return the
    lineage."""
    from runner import cluster, resources
    from runner.growth.stage import run_stage

    # prepare refuses a storage root that holds another job's run, before
    # anything of it (its job.yaml included) is touched.
    root, manifest = prepare(job)
    lineage = _load_or_start(job, root, manifest)
    plan = resources.plan(job, cluster.connect(job), cluster.cpu_nodes())
    # Only a job that will run is recorded as the run's job: one refused for
    # its CPU plan must not block its corrected rerun (see check_resume).
    storage.write_bytes(root.join(JOB_FILE),
                        yaml.safe_dump(job.to_dict(), sort_keys=False).encode())
    log.info("each trial: training workers x CPUs x threads %d x %g x %d, batches "
             "of %d x %d, %g CPUs of augmentation; training in %s", plan.workers,
             plan.cpus_per_worker, plan.threads_per_worker, plan.workers,
             plan.batch_per_worker, plan.aug_cpus,
             precision.describe(job.train.precision))
    progress = Progress(root, job.name, _planned(job), ray_logs=cluster.logs_dir())
    log.info("run folder %s (live state in %s; Ray's own logs in %s)", root.uri,
             root.join(LIVE).uri, cluster.logs_dir() or "the cluster's log folder")
    try:
        _stages(job, lineage, manifest, plan, root, progress, run_stage)
        if job.baseline:
            _run_baseline(job, lineage, manifest, plan, root, run_stage, progress)
    except KeyboardInterrupt:
        progress.finished("interrupted")
        raise
    except BaseException:
        progress.finished("failed")
        raise
    lineage["finished"] = True
    storage.write_json(root.join(LINEAGE), lineage)
    progress.finished()
    print(format_report(lineage))
    return lineage


def _planned(job: JobConfig) -> list[tuple]:
    """(name, epochs, trials) of every stage, for the progress estimate."""
    stages = [(s.name, s.epochs, stage_trials(s, i, job.train.lr))
              for i, s in enumerate(job.stages)]
    return stages + ([("baseline", 0, 1)] if job.baseline else [])


def stage_title(job: JobConfig, index: int) -> str:
    """"stage 2/4 (deepen)": counted as the progress lines count, the baseline
    (if any) last."""
    names = [s.name for s in job.stages] + (["baseline"] if job.baseline else [])
    return f"stage {index + 1}/{len(names)} ({names[index]})"


def _stages(job, lineage, manifest, plan, root, progress, run_stage) -> None:
    done = {s["name"] for s in lineage["stages"]}
    for index, stage in enumerate(job.stages):
        if stage.name in done:
            log.info("%s already done, skipping", stage_title(job, index))
            progress.stage_done(stage.name)
            continue
        log.info("%s: %d epochs per trial", stage_title(job, index), stage.epochs)
        progress.stage_started(stage.name, stage.epochs,
                               stage_trials(stage, index, job.train.lr))
        parent = _parent(lineage)
        t0 = time.time()
        trials = run_stage(job, stage, index == 0, parent, manifest, plan, root,
                           callbacks=[progress.callback(stage.name)])
        record = _stage_record(index, stage.name, parent, trials, manifest, job,
                               lineage)
        record["driver_wall_s"] = time.time() - t0
        lineage["stages"].append(record)
        storage.write_json(root.join(LINEAGE), lineage)
        progress.stage_done(stage.name)
        _log_winner(record)


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


def _run_baseline(job, lineage, manifest, plan, root, run_stage, progress) -> None:
    if lineage.get("baseline"):
        progress.stage_done("baseline")
        return
    stage = baseline_stage(job, lineage, manifest)
    log.info("%s: %s from scratch, budget %.2f TFLOP (up to %d epochs)",
             stage_title(job, len(job.stages)), stage.model["name"],
             stage.budget["flops"] / 1e12, stage.epochs)
    progress.stage_started("baseline", stage.epochs, 1)
    trials = run_stage(job, stage, True, None, manifest, plan, root,
                       callbacks=[progress.callback("baseline")])
    record = _stage_record(len(job.stages), "baseline", None, trials, manifest, job,
                           {"stages": []})
    record["budget_flops"] = stage.budget["flops"]
    lineage["baseline"] = record
    lineage["verdict"] = verdict(lineage["stages"], record)
    storage.write_json(root.join(LINEAGE), lineage)
    progress.stage_done("baseline")
    _log_winner(record)
    log.info("verdict: %s", lineage["verdict"]["text"])


def _load_or_start(job: JobConfig, root: storage.Location, manifest: dict) -> dict:
    path = root.join(LINEAGE)
    lineage = _read_lineage(path) if storage.exists(path) else None
    if lineage is not None:
        return lineage
    data = {k: manifest[k] for k in ("counts", "classes", "base_size", "location")}
    data["skipped"] = len(manifest.get("skipped", []))
    return {"run": job.name, "storage": root.uri, "job": job.to_dict(),
            "data": data, "stages": [], "finished": False}


def check_resume(job: JobConfig) -> None:
    """Refuse to resume the run under ``job.storage`` with another job.

    Rerunning a command resumes its run (finished stages are skipped, the
    stage cut short is restored by Tune), which is only right for the job the
    run started with. So a job whose resolved settings differ from the run's
    ``job.yaml`` (or, without one, the job its lineage keeps) is refused,
    naming the run folder and each differing setting as a dotted path
    (``stages.0.epochs: 4 -> 5``). Only the settings in RESUME_MAY_CHANGE may
    differ: ``storage`` (the run root itself, however it is spelled) and
    ``ray.address`` (which cluster does the work); neither changes a result.
    ``ray.num_cpus`` must match: it sets the CPU split and the threads per
    worker, and so the numbers. Only reads: :func:`prepare` calls it before
    anything is ingested, written or started.
    """
    root = storage.resolve(job.storage)
    lineage = _peek_lineage(root.join(LINEAGE))
    if lineage is not None and [s["name"] for s in lineage["stages"]] != \
            [s.name for s in job.stages][:len(lineage["stages"])]:
        raise RunnerError(
            f"{root.join(LINEAGE).uri} holds a run with other stages; use another "
            "storage root or remove that run")
    stored = _stored_job(root, lineage)
    # a run written before a setting existed goes on at its default
    changes = (job_changes(with_defaults(stored), job.to_dict())
               if stored is not None else [])
    if changes:
        more = len(changes) - SHOWN_CHANGES
        shown = ", ".join(changes[:SHOWN_CHANGES]) + \
            (f" and {more} more" if more > 0 else "")
        raise RunnerError(
            f"{root.uri} holds a run started with other settings ({shown}); a "
            "rerun resumes a run only with the job it started with: give this "
            "job a new storage root (--set storage=NEW_FOLDER) or remove that run")


def _peek_lineage(path: storage.Location) -> dict | None:
    """The lineage at ``path`` if it reads as one; a damaged one is left for
    :func:`_read_lineage` to move aside when the run starts."""
    if not storage.exists(path):
        return None
    try:
        lineage = storage.read_json(path)
    except RunnerError:
        return None
    ok = isinstance(lineage, dict) and isinstance(lineage.get("stages"), list)
    return lineage if ok else None


def _stored_job(root: storage.Location, lineage: dict | None) -> dict | None:
    """The job the run under ``root`` ran: its ``job.yaml``, else the job its
    lineage keeps; None when there is no run."""
    path = root.join(JOB_FILE)
    if not storage.exists(path):
        job = (lineage or {}).get("job")
        return job if isinstance(job, dict) else None
    try:
        stored = yaml.safe_load(storage.read_bytes(path))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        stored = err
    if not isinstance(stored, dict):
        raise RunnerError(
            f"{path.uri} is not a job (it should say which job the run there "
            "ran); restore it, or give this job a new storage root "
            "(--set storage=NEW_FOLDER)")
    return stored


def job_changes(before: dict, after: dict) -> list[str]:
    """``path: old -> new`` for every setting of two job dicts (as
    ``JobConfig.to_dict`` gives) that differs, but those in RESUME_MAY_CHANGE;
    list items by index (``stages.1.variants.0.op``), an item or key one side
    lacks shown whole against ``(not set)``."""
    found: list[tuple[str, object, object]] = []
    _diff(before, after, "", found)
    return [f"{path}: {_shown(old)} -> {_shown(new)}" for path, old, new in found
            if path not in RESUME_MAY_CHANGE]


def _diff(old, new, path: str, found: list) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        pairs = {k: (old.get(k, _NOT_SET), new.get(k, _NOT_SET))
                 for k in dict.fromkeys([*old, *new])}
    elif isinstance(old, list) and isinstance(new, list):
        pairs = {i: (old[i] if i < len(old) else _NOT_SET,
                     new[i] if i < len(new) else _NOT_SET)
                 for i in range(max(len(old), len(new)))}
    else:
        if old is _NOT_SET or new is _NOT_SET or old != new:
            found.append((path, old, new))
        return
    for key, (a, b) in pairs.items():
        _diff(a, b, f"{path}.{key}" if path else str(key), found)


def _shown(value) -> str:
    if value is _NOT_SET:
        return "(not set)"
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _read_lineage(path: storage.Location) -> dict | None:
    """The lineage so far, or None if the file is damaged. A damaged file is
    kept beside it for a look; the run then rebuilds the lineage from Tune's
    own records of each stage (a finished stage restores without training)."""
    try:
        lineage = storage.read_json(path)
        if isinstance(lineage, dict) and isinstance(lineage.get("stages"), list):
            return lineage
        problem = "not a lineage"
    except RunnerError as err:
        problem = str(err)
    name = path.path.rstrip("/").rsplit("/", 1)[-1]
    aside = path.parent.join(f"{name}.damaged-{int(time.time())}")
    path.fs.move(path.path, aside.path)
    log.warning("%s is damaged (%s); moved it to %s and rebuilding the lineage "
                "from the stages' Tune results", path.uri, problem, aside.uri)
    return None


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

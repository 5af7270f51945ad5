"""One growth stage: a Ray Tune experiment over the variants of a parent.

Each trial is a small function (the *trial driver*, 0 CPUs) that

1. builds the child: loads the parent checkpoint, applies the variant's growth
   op, measures the output drift on validation images, and stores the child's
   starting weights and its transfer report under the stage folder;
2. runs a Ray Train ``TorchTrainer`` on the child with the augmented stream,
   forwarding every epoch's metrics to Tune (``TuneReportCallback``), where
   ASHA may stop a weak trial after its grace period.

The stage folder ``<root>/<stage>/`` holds Tune's experiment (results,
progress.csv, TensorBoard event files), ``train/<trial>/epoch-NNN`` (the
checkpoints) and ``init/<trial>/`` (the transferred weights and report).
"""

from __future__ import annotations

import logging
import os
import re
import tempfile

import torch

from ray import tune
from ray.train import (CheckpointConfig, DataConfig, FailureConfig, LoggingConfig,
                       RunConfig, ScalingConfig)
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

from runner import storage
from runner.config import AugmentConfig, JobConfig, StageConfig
from runner.data.pipeline import build_dataset, count_rows, eval_view
from runner.evaluate import load_split
from runner.growth.variants import (StageBudget, best_epoch, op_params, stage_variants,
                                    trial_name)
from runner.model import ModelSpec, build_model, get_spec
from runner.model.checkpoint import load_checkpoint, save_checkpoint
from runner.model.growth import apply_op, measure_drift
from runner.resources import Plan
from runner.train.loop import train_loop, worker_env

log = logging.getLogger(__name__)

DRIFT_IMAGES = 256  # validation images the transfer drift is measured on

# The trial driver only waits on its TorchTrainer: it holds no CPU, only a
# token of memory (Tune refuses an empty request). It lives on the head node,
# with the job's own driver, and so does the Ray Train controller it starts:
# losing a (spot) worker node then costs a restart of the training workers,
# never the trial.
TRIAL_DRIVER = tune.PlacementGroupFactory(
    [{"CPU": 0, "memory": 64 * 2**20, "node:__internal_head__": 0.001}])


def run_stage(job: JobConfig, stage: StageConfig, first: bool, parent: dict | None,
              manifest: dict, plan: Plan, root: storage.Location,
              callbacks: list | None = None) -> list[dict]:
    """Run one stage (``first``: train ``stage.model`` from scratch) and return
    one record per trial (see :func:`trial_record`). ``callbacks`` are Tune
    callbacks (the run's progress)."""
    variants = stage_variants(stage, 0 if first else 1)
    lrs = stage.lr or [job.train.lr]
    context = {"job": job.to_dict(), "stage": stage.name, "epochs": stage.epochs,
               "budget": stage.budget or {},
               "parent": parent, "manifest": manifest, "plan": plan.__dict__,
               "root": root.uri}
    trainable = tune.with_parameters(_trial, context=context)
    param_space = {"variant": tune.grid_search(variants), "lr": tune.grid_search(lrs)}
    tuner = _tuner(trainable, param_space, stage, root, callbacks or [])
    # Tune's console output (its experiment banner and trial tables) would
    # bury the run's own progress lines; verbose=0 silences only the older
    # reporter, which this selects.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    results = tuner.fit()
    return [trial_record(r, root, stage.name, stage.epochs) for r in results]


def _tuner(trainable, param_space, stage: StageConfig, root: storage.Location,
           callbacks: list):
    name, epochs = stage.name, stage.epochs
    exp = root.join(name)
    trainable = tune.with_resources(trainable, TRIAL_DRIVER)
    remote_fs = None if root.is_local else root.fs
    exp_path = exp.uri if remote_fs is None else exp.path  # a path on remote_fs
    if tune.Tuner.can_restore(exp_path, storage_filesystem=remote_fs):
        # A driver that died mid-stage: finished trials are kept, interrupted
        # ones continue from their last checkpoint.
        log.info("resuming stage %s from %s", name, exp.uri)
        return tune.Tuner.restore(exp_path, trainable, resume_errored=True,
                                  storage_filesystem=remote_fs)
    # ASHA's grace period: a grown network often dips for its first steps, so
    # no trial is judged before it has finished an epoch. max_t lies past the
    # last epoch so that a trial ends by returning, never by being cut at its
    # final report while its trainer still holds its CPUs.
    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=epochs + 1,
                              grace_period=1, reduction_factor=2)
    return tune.Tuner(
        trainable, param_space=param_space,
        tune_config=tune.TuneConfig(metric="val_acc", mode="max", scheduler=scheduler,
                                    max_concurrent_trials=1,
                                    # A stopped trial's actor must go, and with
                                    # it the trainer it owns and its CPUs.
                                    reuse_actors=False,
                                    trial_name_creator=_trial_name,
                                    trial_dirname_creator=_trial_name),
        run_config=tune.RunConfig(name=name, verbose=0, callbacks=callbacks,
                                  stop=_StageStopper(stage.stage_budget)
                                  if stage.stage_budget else None,
                                  **_ray_storage(root)),
    )


class _StageStopper(tune.Stopper):
    """Tune's side of a stage budget (``stage_budget`` in the job): stop the
    trial whose epoch spent the last of it, and start no other."""

    def __init__(self, cap: dict):
        self.budget = StageBudget(cap)

    def __call__(self, trial_id: str, result: dict) -> bool:
        return self.budget.spend(trial_id, result)

    def stop_all(self) -> bool:
        return self.budget.exhausted()


def _trial_name(trial) -> str:
    return trial_name(trial.config)


def _trial(config: dict, context: dict) -> None:
    """The trial driver: prepare the child, then train it under Ray Train."""
    name = trial_name(config)
    root = storage.resolve(context["root"])
    init = root.join(context["stage"], "init", name)
    spec, frozen = _prepare_child(config["variant"], context, init)
    loop_config = _loop_config(config, context, name, spec, frozen, init)
    shards, fs = _shard_paths(context, "train")
    loop_config["train_images"] = count_rows(
        shards, fs, "train", context["job"]["data"]["val_fraction"])
    _trainer(loop_config, _datasets(context), context, name, root).fit()


def _datasets(context: dict) -> dict:
    """The augmented training stream, every epoch of the trial in one (the
    workers count off their epochs, see ``runner.train.loop``); Ray Train
    splits it over the workers."""
    job, plan = context["job"], context["plan"]
    data = job["data"]
    shards, fs = _shard_paths(context, "train")
    train = build_dataset(
        shards, fs, "train", augment=AugmentConfig(**job["augment"]),
        val_fraction=data["val_fraction"], base_size=data["base_size"],
        image_size=data["image_size"], task_cpus=plan["task_cpus"],
        max_tasks=plan["aug_tasks"], seed=job["seed"],
        passes=context["epochs"] * job["augment"]["views_per_epoch"])
    return {"train": train}


def _loop_config(config, context, name, spec, frozen, init) -> dict:
    """Everything ``runner.train.loop.train_loop`` reads."""
    job, plan = context["job"], context["plan"]
    data = job["data"]
    return {
        "spec": spec.to_dict(), "init_checkpoint": init.uri, "trial": name,
        "epochs": context["epochs"], "budget": context["budget"],
        "lr": config["lr"], "lr_schedule": job["train"]["lr_schedule"],
        "weight_decay": job["train"]["weight_decay"],
        "precision": job["train"]["precision"],
        "batch_size": plan["batch_per_worker"],
        "views_per_epoch": job["augment"]["views_per_epoch"],
        "threads": plan["threads_per_worker"],
        "val": {"manifest": context["manifest"], "val_fraction": data["val_fraction"],
                "image_size": data["image_size"]},
        "frozen": frozen, "freeze_epochs": config["variant"].get("freeze_epochs", 0),
        "seed": job["seed"],
    }


def _ray_storage(loc: storage.Location) -> dict:
    """Ray's storage arguments: a local folder as is, anything else as a path
    on its pyarrow filesystem."""
    if loc.is_local:
        return {"storage_path": loc.uri}
    return {"storage_path": loc.path, "storage_filesystem": loc.fs}


def _trainer(loop_config: dict, datasets: dict, context: dict, name: str,
             root: storage.Location) -> TorchTrainer:
    plan = context["plan"]
    return TorchTrainer(
        train_loop, train_loop_config=loop_config, datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"]),
        scaling_config=ScalingConfig(
            num_workers=plan["workers"],
            resources_per_worker={"CPU": plan["cpus_per_worker"]},
            # Over as many nodes as there are: a lost node takes fewer workers.
            placement_strategy="SPREAD"),
        run_config=RunConfig(
            name=name, **_ray_storage(root.join(context["stage"], "train")),
            callbacks=[TuneReportCallback()],
            checkpoint_config=CheckpointConfig(num_to_keep=None),
            failure_config=FailureConfig(max_failures=2),
            worker_runtime_env={"env_vars": worker_env(plan["threads_per_worker"])},
            # Our own epoch line says what a user needs; Ray Train's per-report
            # INFO lines stay in the run's Ray log files.
            logging_config=LoggingConfig(log_level="WARNING")),
    )


def _shard_paths(context: dict, split: str):
    manifest = context["manifest"]
    loc = storage.resolve(manifest["location"])
    return [loc.join(p).path for p in manifest["shards"][split]], loc.fs


def _prepare_child(variant: dict, context: dict, init: storage.Location):
    """Build the child's starting weights for ``variant`` and store them with
    the transfer report under ``init``. Returns (spec, tensors to freeze)."""
    seed = context["job"]["seed"]
    if variant["op"] == "scratch":
        model = variant["model"]
        spec = (ModelSpec.from_dict(model) if isinstance(model, dict)
                else get_spec(model))
        torch.manual_seed(seed)  # the same job seed gives the same first weights
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(tmp, spec, build_model(spec).state_dict(), {"epoch": 0})
            storage.upload_dir(tmp, init)
        return spec, []
    if variant["op"] == "load":
        return _load_start(variant["checkpoint"], init), []
    with tempfile.TemporaryDirectory() as tmp:
        parent = storage.resolve(context["parent"]["checkpoint"])
        p_spec, p_state, _ = load_checkpoint(storage.download_dir(parent, tmp + "/p"))
        spec, state, report = apply_op(p_spec, p_state, variant["op"],
                                       **op_params(variant, seed))
        images, labels = _drift_batch(context)
        measure_drift(p_spec, p_state, spec, state, images, labels, report)
        log.info("transfer %s -> %s\n%s", p_spec.name, spec.name, report.format())
        out = tmp + "/child"
        save_checkpoint(out, spec, state, {"epoch": 0, "transfer": report.to_dict()})
        storage.upload_dir(out, init)
    frozen = [t["name"] for t in report.to_dict()["tensors"] if t["status"] == "copied"]
    return spec, frozen


def _load_start(checkpoint: str, init: storage.Location) -> ModelSpec:
    """A first stage that starts from a checkpoint: its weights, verified,
    become the trial's starting weights. Returns its spec."""
    with tempfile.TemporaryDirectory() as tmp:
        spec, state, meta = load_checkpoint(storage.download_dir(
            storage.resolve(checkpoint), tmp + "/source"))
        save_checkpoint(tmp + "/start", spec, state,
                        {"epoch": 0, "source": checkpoint,
                         "source_sha256": meta.get("sha256")})
        storage.upload_dir(tmp + "/start", init)
    log.info("starting from %s (%s)", checkpoint, spec.name)
    return spec


def _drift_batch(context: dict):
    """Up to DRIFT_IMAGES validation images, eval view, from the first shards."""
    data = context["job"]["data"]
    pixels, y = load_split(context["manifest"], "val", data["val_fraction"],
                           limit=DRIFT_IMAGES)
    return eval_view(pixels, data["image_size"]), torch.from_numpy(y).float()


def trial_record(result, root: storage.Location, stage: str,
                 planned_epochs: int | None = None) -> dict:
    """What the lineage keeps of one trial: its variant, every epoch's metrics,
    its best epoch and checkpoint, its compute, and its transfer report.

    Status: "done" (every planned epoch), "stopped early" (ASHA or a budget
    ended it sooner), "error", or "not run" (the stage's budget was spent
    before it started)."""
    cfg = result.config
    name = trial_name(cfg)
    df = result.metrics_dataframe
    keep = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc",
            "images_per_s", "data_wait_frac", "train_s", "flops", "cpu_s",
            "wall_s", "images_seen", "restarts", "checkpoint_path"]
    rows = [] if df is None or "val_acc" not in df else \
        df[[k for k in keep if k in df]].to_dict("records")
    # An epoch trained again after a restart (its checkpoint was lost) is
    # reported twice; the later report is the one the model went on from.
    epochs = list({row["epoch"]: row for row in rows}.values())
    for epoch in epochs:  # Ray reports paths on the filesystem; keep URIs
        if isinstance(epoch.get("checkpoint_path"), str):
            path = epoch["checkpoint_path"]
            epoch["checkpoint_path"] = storage.within(root, path).uri
    epochs = with_missing_epochs(epochs, root.join(stage, "train", name), keep)
    record = {"name": name, "variant": cfg["variant"], "lr": cfg["lr"],
              "status": _status(result, epochs, planned_epochs),
              "error": _error_line(result.error) if result.error else None,
              "epochs": epochs, "transfer": _transfer_report(root, stage, name)}
    if epochs:
        best = best_epoch(epochs)
        record["best"] = {"epoch": best["epoch"], "val_acc": best["val_acc"],
                          "flops": best["flops"], "checkpoint": best["checkpoint_path"]}
        last = epochs[-1]
        record["compute"] = {k: last[k] for k in ("flops", "cpu_s", "wall_s")}
        record["restarts"] = int(last.get("restarts", 0))
    return record


def with_missing_epochs(epochs: list[dict], trial_dir: storage.Location,
                        keep: list[str]) -> list[dict]:
    """``epochs`` with any earlier epoch Tune's results lack (seen after a run
    was stopped and resumed) filled in from that epoch's checkpoint, which
    carries the metrics it was reported with."""
    have = {e["epoch"] for e in epochs}
    for n in range(1, max(have, default=0)):
        folder = trial_dir.join(f"epoch-{n:03d}")
        meta = folder.join("meta.json")
        if n in have or not storage.exists(meta):
            continue
        metrics = storage.read_json(meta).get("metrics") or {}
        if "val_acc" in metrics:
            epochs.append({**{k: metrics[k] for k in keep if k in metrics},
                           "checkpoint_path": folder.uri})
    return sorted(epochs, key=lambda e: e["epoch"])


def _status(result, epochs: list, planned: int | None) -> str:
    if result.error:
        return "error"
    if not epochs:
        return "not run"
    if planned is not None and epochs[-1]["epoch"] < planned:
        return "stopped early"
    return "done"


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _error_line(error) -> str:
    """The cause of a failed trial in one line: the innermost exception's own
    message, without Ray's wrappers (``ray::...``, tracebacks, colour codes)."""
    cause = error
    while getattr(cause, "cause", None) is not None or cause.__cause__ is not None:
        cause = getattr(cause, "cause", None) or cause.__cause__
    lines = [_ANSI.sub("", line).strip() for line in str(cause).splitlines()]
    lines = [line for line in lines if line and not line.startswith(
        ("Traceback", "File ", "ray::", "^", "During handling"))]
    # A traceback's last line is the exception itself.
    return lines[-1] if lines else type(cause).__name__


def _transfer_report(root: storage.Location, stage: str, name: str):
    meta = root.join(stage, "init", name, "meta.json")
    return storage.read_json(meta).get("transfer") if storage.exists(meta) else None

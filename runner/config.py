"""The job file: typed, validated settings for one growth run.

A job file is YAML with the sections below; every setting has a default, so
a job names only what it changes. Unknown keys are errors that name the key
and suggest the nearest known one; out-of-range values name the setting and
the allowed range. ``--set section.key=value`` on the command line overrides
any setting (the value is parsed as YAML).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from runner.errors import RunnerError

BUDGET_UNITS = ("flops", "cpu_s", "wall_s")
LR_SCHEDULES = ("constant", "cosine")
GROWTH_OPS = ("widen_conv", "widen_dense", "deepen_conv", "deepen_block",
              "plain_copy", "fresh", "combine")
COMBINED_OPS = GROWTH_OPS[:4]  # what a `combine` variant's steps may be


@dataclass
class DataConfig:
    # image folder with training_set/<class>/ and test_set/<class>/
    root: str = "../shared/datasets/cats_dogs"
    shards: str | None = None      # Parquet shards; default <storage>/data
    base_size: int = 72            # px, stored size; random crops stay inside it
    image_size: int = 64           # px, what the network sees
    val_fraction: float = 0.1      # of training_set, held out for selection

    def validate(self) -> None:
        _whole("data.base_size", self.base_size)
        _whole("data.image_size", self.image_size)
        if self.image_size > self.base_size:
            raise RunnerError(
                f"data.image_size ({self.image_size}) must not exceed "
                f"data.base_size ({self.base_size})")
        if not 0 < self.val_fraction < 1:
            raise RunnerError(
                f"data.val_fraction must be between 0 and 1, got {self.val_fraction}")


@dataclass
class AugmentConfig:
    views_per_epoch: int = 1       # augmented views of each image per epoch
    flip: bool = True              # mirror left-right with probability 1/2
    zoom: float = 0.2              # crop area in [1 - zoom, 1] of the base image
    rotation: float = 15.0         # degrees, uniform in [-rotation, rotation]
    shear: float = 0.2             # shear angle in radians-ish units, as Keras
    cpus: float | None = None      # CPUs for augmentation workers; None = auto

    def validate(self) -> None:
        _whole("augment.views_per_epoch", self.views_per_epoch)
        if not 0 <= self.zoom < 1:
            raise RunnerError(f"augment.zoom must be in [0, 1), got {self.zoom}")
        if not 0 <= self.rotation <= 180:
            raise RunnerError(
                f"augment.rotation must be in [0, 180] degrees, got {self.rotation}")
        if self.cpus is not None:
            _positive("augment.cpus", self.cpus)


@dataclass
class TrainConfig:
    workers: int | None = None     # Ray Train workers per trial; None = one per node
    cpus_per_worker: float | None = None  # None = auto (see runner.resources)
    batch_size: int = 64           # per worker
    lr: float = 1e-3               # Adam learning rate
    # "constant", or "cosine": each trial anneals lr epoch by epoch from `lr`
    # down to LR_FLOOR x lr at its last epoch
    lr_schedule: str = "constant"
    weight_decay: float = 0.0

    def validate(self) -> None:
        if self.workers is not None:
            _whole("train.workers", self.workers)
        _whole("train.batch_size", self.batch_size)
        _positive("train.lr", self.lr)
        if self.lr_schedule not in LR_SCHEDULES:
            raise RunnerError(f"train.lr_schedule must be one of "
                              f"{', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.cpus_per_worker is not None:
            _positive("train.cpus_per_worker", self.cpus_per_worker)


@dataclass
class StageConfig:
    name: str
    epochs: int = 1                # epochs per trial
    model: str | None = None       # first stage: a spec name or JSON file
    # first stage only: start from this checkpoint (folder or URI, e.g. one
    # written by `runner import-keras`) instead of random weights
    init: str | None = None
    variants: list[dict] = field(default_factory=list)  # later stages: ops
    lr: list[float] | None = None  # grid of learning rates; None = train.lr
    # Per-trial compute cap: {flops: 2e12} (training FLOPs), {cpu_s: 600}
    # (training workers' CPU-seconds) or {wall_s: 300}; a trial stops at the
    # end of the epoch that reaches it, or after `epochs`, whichever is first.
    budget: dict | None = None
    # The same for the whole stage: its trials' spending summed. Once it is
    # reached the running trial stops at its epoch end and no other starts.
    stage_budget: dict | None = None

    def validate(self, index: int) -> None:
        where = f"stages[{index}] ({self.name})"
        _whole(f"{where}.epochs", self.epochs)
        for key in ("budget", "stage_budget"):
            for unit, amount in (getattr(self, key) or {}).items():
                if unit not in BUDGET_UNITS:
                    raise RunnerError(f"{where}.{key}: unknown unit {unit!r}; use "
                                      f"one of {', '.join(BUDGET_UNITS)}")
                _positive(f"{where}.{key}.{unit}", amount)
        for key in ("model", "init"):
            if getattr(self, key) is not None and not isinstance(getattr(self, key), str):
                raise RunnerError(f"{where}.{key} must be a name or a path, got "
                                  f"{getattr(self, key)!r}")
        if index == 0 and not (self.model or self.init):
            raise RunnerError(f"{where}: the first stage needs `model:` (a spec) "
                              "or `init:` (a checkpoint)")
        if index == 0 and self.model and self.init:
            raise RunnerError(f"{where}: give `model:` or `init:`, not both (a "
                              "checkpoint carries its own spec)")
        if index > 0 and self.init:
            raise RunnerError(f"{where}: only the first stage starts from `init:`; "
                              "later stages start from the previous winner")
        if index > 0 and not self.variants:
            raise RunnerError(f"{where}: a growth stage needs `variants:`")
        for v in self.variants:
            op = v.get("op") if isinstance(v, dict) else None
            if op not in GROWTH_OPS:
                ops = ", ".join(GROWTH_OPS)
                raise RunnerError(f"{where}: variant {v!r} needs `op:` one of {ops}")
            if op == "combine":
                _check_steps(where, v)
        for lr in self.lr or []:
            _positive(f"{where}.lr", lr)


@dataclass
class RayConfig:
    # None: RAY_ADDRESS if set, else start a private local Ray; "auto": join
    # the `ray start` cluster on this machine
    address: str | None = None
    num_cpus: int | None = None    # CPUs of a cluster we start; None = all

    def validate(self) -> None:
        if self.num_cpus is not None:
            _whole("ray.num_cpus", self.num_cpus)


@dataclass
class JobConfig:
    name: str = "cats_dogs"
    storage: str = "runs/cats_dogs"  # run root: a folder or a pyarrow URI (s3://...)
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    stages: list[StageConfig] = field(default_factory=list)
    # Train the final architecture from scratch with the growth path's FLOPs,
    # to judge whether growing paid.
    baseline: bool = True
    ray: RayConfig = field(default_factory=RayConfig)

    def validate(self) -> "JobConfig":
        self.data.validate()
        self.augment.validate()
        self.train.validate()
        self.ray.validate()
        _whole("seed", self.seed, low=0)
        if not self.stages:
            raise RunnerError("the job has no `stages:`")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise RunnerError(f"stage names must be unique, got {names}")
        for i, stage in enumerate(self.stages):
            stage.validate(i)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads 2e12 (no dot or no sign in the exponent) as a string;
    a job file means a number there, as YAML 1.2 and JSON do."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[0-9][0-9_]*[eE][-+]?[0-9]+
                   |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                   |\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def _yaml(text):
    return yaml.load(text, Loader=_Loader)


def _positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise RunnerError(f"{name} must be a positive number, got {value!r}")


_SECTIONS = {"data": DataConfig, "augment": AugmentConfig, "train": TrainConfig,
             "ray": RayConfig}


def _check_steps(where: str, variant: dict) -> None:
    steps = variant.get("steps")
    if not isinstance(steps, list) or len(steps) < 2:
        raise RunnerError(f"{where}: variant {variant!r} needs `steps:`, a list of "
                          "two or more ops to apply in turn")
    for step in steps:
        if not isinstance(step, dict) or step.get("op") not in COMBINED_OPS:
            raise RunnerError(f"{where}: combine step {step!r} needs `op:` one of "
                              f"{', '.join(COMBINED_OPS)}")


def _whole(name: str, value, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        kind = "a positive whole number" if low == 1 else f"a whole number, {low} or more"
        raise RunnerError(f"{name} must be {kind}, got {value!r}")


def _build(cls, raw: Any, where: str):
    """Make dataclass ``cls`` from a mapping, refusing unknown keys by name."""
    if not isinstance(raw, dict):
        raise RunnerError(f"{where} must be a mapping, got {type(raw).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            hint = difflib.get_close_matches(str(key), known, n=1)
            did = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise RunnerError(f"unknown setting {where}.{key}{did}".replace(
                "job.", "", 1))
    kwargs = {}
    for key, value in raw.items():
        if key in _SECTIONS and cls is JobConfig:
            value = _build(_SECTIONS[key], value or {}, f"job.{key}")
        elif key == "stages" and cls is JobConfig:
            if not isinstance(value, list):
                raise RunnerError("stages must be a list")
            value = [_build(StageConfig, s, f"job.stages[{i}]")
                     for i, s in enumerate(value)]
        elif key == "lr" and cls is StageConfig and value is not None \
                and not isinstance(value, list):
            value = [value]
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise RunnerError(f"{where}: {err}") from err


def _apply_override(raw: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise RunnerError(f"--set {assignment!r}: expected key=value")
    dotted, text = assignment.split("=", 1)
    *parents, leaf = dotted.strip().split(".")
    node = raw
    for part in parents:
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict):
            node = node.setdefault(part, {})
        else:
            raise RunnerError(f"--set {dotted}: no section {part!r}")
    if isinstance(node, list):
        raise RunnerError(f"--set {dotted}: {leaf!r} is not a list index in range")
    node[leaf] = _yaml(text)


def load_job(path: str, overrides: list[str] = ()) -> JobConfig:
    """Read, override and validate a job file; relative paths are resolved
    against the current directory (where the command runs)."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = _yaml(f) or {}
    except FileNotFoundError:
        raise RunnerError(f"job file {path}: no such file") from None
    except IsADirectoryError:
        raise RunnerError(f"job file {path}: is a folder, not a file") from None
    except UnicodeDecodeError:
        raise RunnerError(f"job file {path}: not UTF-8 text") from None
    except yaml.YAMLError as err:
        raise RunnerError(f"job file {path}: not valid YAML ({err})") from err
    if not isinstance(raw, dict):
        raise RunnerError(f"job file {path}: expected a mapping at the top")
    for assignment in overrides:
        _apply_override(raw, assignment)
    job = _build(JobConfig, raw, "job").validate()
    job.data.root = os.path.abspath(job.data.root)
    first = job.stages[0]
    if first.init and "://" not in first.init:
        # Trials run in folders of their own: a relative path must not
        # follow them there.
        first.init = os.path.abspath(first.init)
    return job

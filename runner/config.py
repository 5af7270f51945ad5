"""The job file: typed, validated settings for one growth run.

A job file is YAML with the sections below; every setting has a default, so
a job names only what it changes. Unknown keys are errors that name the key
and suggest the nearest known one; a duplicate key is an error naming both
lines; values of the wrong type or out of range name the setting and what it
may be. ``--set section.key=value`` on the command line overrides any setting
(the value is parsed as YAML). An error the file itself holds names the file;
one that only an override brings does not.

Everything here is checked without torch or Ray. What needs the model specs
(does every growth variant build?) is checked by
``runner.growth.loop.prepare``, still before anything runs.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from runner.errors import RunnerError

BUDGET_UNITS = ("flops", "cpu_s", "wall_s")
LR_SCHEDULES = ("constant", "cosine")
PRECISIONS = ("auto", "bf16", "fp32")  # see runner.train.precision
MAX_SEED = 2**63 - 1
GROWTH_OPS = ("widen_conv", "widen_dense", "deepen_conv", "deepen_block",
              "plain_copy", "fresh", "combine")
COMBINED_OPS = GROWTH_OPS[:4]  # what a `combine` variant's steps may be
# Names in the run root that are not stages: the data shards, the baseline,
# the run's own files, evaluate's shards and report --html's default page.
RESERVED_NAMES = ("data", "baseline", "lineage.json", "live.json", "job.yaml",
                  "eval-data", "report.html")


@dataclass
class DataConfig:
    # image folder with training_set/<class>/ and test_set/<class>/
    root: str = "../shared/datasets/cats_dogs"
    shards: str | None = None      # Parquet shards; default <storage>/data
    base_size: int = 72            # px, stored size; random crops stay inside it
    image_size: int = 64           # px, what the network sees
    val_fraction: float = 0.1      # of training_set, held out for selection

    def validate(self) -> None:
        _text("data.root", self.root, "a folder or a URI")
        if self.shards is not None:
            _text("data.shards", self.shards, "a folder or a URI (or null: <storage>/data)")
        _whole("data.base_size", self.base_size)
        _whole("data.image_size", self.image_size)
        if self.image_size > self.base_size:
            raise RunnerError(
                f"data.image_size ({self.image_size}) must not exceed "
                f"data.base_size ({self.base_size})")
        _number("data.val_fraction", self.val_fraction,
                "a number between 0 and 1 (exclusive)", lambda v: 0 < v < 1)


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
        _bool("augment.flip", self.flip)
        _number("augment.zoom", self.zoom, "a number in [0, 1)", lambda v: 0 <= v < 1)
        _number("augment.rotation", self.rotation, "a number in [0, 180] (degrees)",
                lambda v: 0 <= v <= 180)
        _number("augment.shear", self.shear, "a number >= 0", lambda v: v >= 0)
        if self.cpus is not None:
            _positive("augment.cpus", self.cpus)


@dataclass
class TrainConfig:
    workers: int | None = None     # Ray Train workers per trial; None = one per core
    cpus_per_worker: float | None = None  # None = auto (see runner.resources)
    batch_size: int = 128          # global: split evenly over the workers
    lr: float = 1e-3               # Adam learning rate
    # "constant", or "cosine": each trial anneals lr epoch by epoch from `lr`
    # down to LR_FLOOR x lr at its last epoch
    lr_schedule: str = "constant"
    weight_decay: float = 0.0
    # a step's arithmetic: "bf16" (autocast), "fp32", or "auto": bf16 where
    # the worker's CPU has native bfloat16 (AVX512-BF16, AMX), else fp32
    precision: str = "auto"

    def validate(self) -> None:
        if self.workers is not None:
            _whole("train.workers", self.workers)
        _whole("train.batch_size", self.batch_size)
        _positive("train.lr", self.lr)
        _number("train.weight_decay", self.weight_decay, "a number >= 0",
                lambda v: v >= 0)
        if self.lr_schedule not in LR_SCHEDULES:
            raise RunnerError(f"train.lr_schedule must be one of "
                              f"{', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.precision not in PRECISIONS:
            raise RunnerError(f"train.precision must be one of "
                              f"{', '.join(PRECISIONS)}, got {self.precision!r}")
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
        _plain_name(f"stages[{index}].name", self.name,
                    " (it names the stage's folder in the run)")
        where = f"stages[{index}] ({self.name})"
        _whole(f"{where}.epochs", self.epochs)
        self._check_budgets(where)
        self._check_start(index, where)
        self._check_variants(index, where)
        self._check_lr(where)

    def _check_budgets(self, where: str) -> None:
        for key in ("budget", "stage_budget"):
            budget = getattr(self, key)
            if budget is not None and not isinstance(budget, dict):
                raise RunnerError(f"{where}.{key} must be a mapping of unit to amount, "
                                  f"e.g. {{flops: 2e12}}, got {budget!r}")
            for unit, amount in (budget or {}).items():
                if unit not in BUDGET_UNITS:
                    raise RunnerError(f"{where}.{key}: unknown unit {unit!r}; use "
                                      f"one of {', '.join(BUDGET_UNITS)}")
                _positive(f"{where}.{key}.{unit}", amount)

    def _check_start(self, index: int, where: str) -> None:
        """What a stage starts from: the first a spec or a checkpoint, every
        later one the previous winner."""
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
        if index > 0 and self.model is not None:
            raise RunnerError(f"{where}.model: only the first stage names a model; "
                              "later stages grow the previous winner by `variants:`")

    def _check_variants(self, index: int, where: str) -> None:
        """The shape of each variant; whether it builds is checked on the
        model specs before the run (runner.growth.variants.stage_children)."""
        if not isinstance(self.variants, list):
            raise RunnerError(f"{where}.variants must be a list of growth ops, e.g. "
                              f"[{{op: deepen_block}}], got {self.variants!r}")
        if index == 0 and self.variants:
            raise RunnerError(f"{where}.variants: the first stage trains its `model:` "
                              "or `init:`; variants belong to later stages")
        if index > 0 and not self.variants:
            raise RunnerError(f"{where}: a growth stage needs `variants:`")
        for j, v in enumerate(self.variants):
            op = v.get("op") if isinstance(v, dict) else None
            if op not in GROWTH_OPS:
                ops = ", ".join(GROWTH_OPS)
                raise RunnerError(f"{where}: variant {v!r} needs `op:` one of {ops}")
            if op == "combine":
                _check_steps(where, v)
            if "freeze_epochs" in v:
                self._check_freeze(f"{where}.variants[{j}].freeze_epochs",
                                   v["freeze_epochs"])

    def _check_freeze(self, name: str, epochs) -> None:
        # Frozen for more epochs than the trial has means frozen throughout,
        # which freeze_epochs equal to the stage's epochs already says.
        _whole(name, epochs, low=0)
        if epochs > self.epochs:
            raise RunnerError(f"{name} must be at most the stage's {self.epochs} "
                              f"epochs, got {epochs}")

    def _check_lr(self, where: str) -> None:
        if self.lr is not None and not self.lr:
            raise RunnerError(f"{where}.lr must be a positive number or a non-empty "
                              "list of them (or left out: train.lr), got []")
        for lr in self.lr or []:
            _positive(f"{where}.lr", lr)


@dataclass
class RayConfig:
    # None: RAY_ADDRESS if set, else start a private local Ray; "auto": join
    # the `ray start` cluster on this machine
    address: str | None = None
    num_cpus: int | None = None    # CPUs of a cluster we start; None = all

    def validate(self) -> None:
        if self.address is not None:
            _text("ray.address", self.address,
                  "a Ray address (host:port, ray://host:port or auto) or null")
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
    # The job file it was read from and the --set overrides applied to it
    # (not settings: to_dict leaves them out), so that later checks can name
    # the file when it is to blame.
    source = None
    overrides = ()

    def validate(self) -> "JobConfig":
        _plain_name("name", self.name)
        _text("storage", self.storage, "a folder or a URI (s3://...)")
        self.data.validate()
        self.augment.validate()
        self.train.validate()
        self.ray.validate()
        _whole("seed", self.seed, low=0)
        if self.seed > MAX_SEED:  # torch's generators take a signed 64-bit seed
            raise RunnerError(f"seed must be at most {MAX_SEED} (2**63 - 1), "
                              f"got {self.seed}")
        _bool("baseline", self.baseline)
        if not self.stages:
            raise RunnerError("the job has no `stages:`")
        for i, stage in enumerate(self.stages):
            stage.validate(i)
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise RunnerError(f"stage names must be unique, got {names}")
        for i, name in enumerate(names):
            if name in RESERVED_NAMES:
                raise RunnerError(f"stages[{i}].name {name!r} is taken: the run "
                                  f"folder keeps {', '.join(RESERVED_NAMES)} of "
                                  "its own")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads 2e12 (no dot or no sign in the exponent) as a string;
    a job file means a number there, as YAML 1.2 and JSON do. A key given
    twice in one mapping is an error (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        first_seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` may be overridden key by key
            key = self.construct_object(key_node, deep=True)
            try:
                first = first_seen.setdefault(key, key_node.start_mark)
            except TypeError:  # an unhashable key: SafeLoader refuses it itself
                continue
            if first is not key_node.start_mark:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line "
                    f"{first.line + 1})", key_node.start_mark)
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[0-9][0-9_]*[eE][-+]?[0-9]+
                   |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                   |\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def _yaml(text):
    return yaml.load(text, Loader=_Loader)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error in one line: where, what, and what was open there."""
    if not isinstance(err, yaml.MarkedYAMLError) or err.problem_mark is None:
        return " ".join(str(err).split())
    mark = err.problem_mark
    text = f"at line {mark.line + 1}, column {mark.column + 1}: {err.problem}"
    if err.context:
        opened = err.context_mark
        text += f" ({err.context}" + (
            f" at line {opened.line + 1}, column {opened.column + 1})"
            if opened is not None else ")")
    return text


def _is_number(value) -> bool:
    """A finite int or float; YAML's .nan and .inf are not numbers to a job,
    nor is true."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _number(name: str, value, allowed: str, ok=lambda v: True) -> None:
    if not _is_number(value) or not ok(value):
        raise RunnerError(f"{name} must be {allowed}, got {value!r}")


def _positive(name: str, value) -> None:
    _number(name, value, "a positive number", lambda v: v > 0)


def _bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise RunnerError(f"{name} must be true or false, got {value!r}")


def _text(name: str, value, allowed: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise RunnerError(f"{name} must be {allowed}, got {value!r}")


def _plain_name(name: str, value, why: str = "") -> None:
    """A name, not a path: non-empty, no '/' or '\\', not '.' or '..'."""
    if not isinstance(value, str) or not value.strip() or value in (".", "..") \
            or any(c in value for c in "/\\"):
        raise RunnerError(f"{name} must be a non-empty name without '/' or "
                          f"'\\'{why}, got {value!r}")


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
    label = where.removeprefix("job.")
    if not isinstance(raw, dict):
        raise RunnerError(f"{label} must be a mapping, got {type(raw).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            hint = difflib.get_close_matches(str(key), known, n=1)
            did = f" (did you mean {hint[0]!r}?)" if hint else ""
            setting = f"{label}.{key}" if cls is not JobConfig else str(key)
            raise RunnerError(f"unknown setting {setting}{did}")
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
        raise RunnerError(f"{label}: {err}") from err


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
    try:
        node[leaf] = _yaml(text)
    except yaml.YAMLError as err:
        raise RunnerError(f"--set {dotted}: not valid YAML {_yaml_problem(err)}") \
            from err


def load_job(path: str, overrides: list[str] = ()) -> JobConfig:
    """Read, override and validate a job file; relative paths are resolved
    against the current directory (where the command runs). An error names
    the file unless only the overrides bring it."""
    raw = _read_job_file(path)
    try:
        job = _job(copy.deepcopy(raw), overrides)
    except RunnerError as err:
        raise RunnerError(_blame(path, raw, overrides, err)) from err
    job.source, job.overrides = path, tuple(overrides)
    return job


def with_defaults(raw: dict) -> dict:
    """A job dict (a run's stored job.yaml) as this runner reads a job file:
    settings it lacks get their defaults; one this runner no longer reads
    comes back as it was given."""
    try:
        return _job(copy.deepcopy(raw), ()).to_dict()
    except RunnerError:
        return raw


def blame_file(job: JobConfig, err: RunnerError, check) -> RunnerError:
    """``err`` (raised by ``check(job)``), naming the job file if the file
    fails ``check`` the same way without its overrides."""
    if job.source is None:
        return err
    if job.overrides:
        try:
            check(load_job(job.source))
        except RunnerError as alone:
            if str(alone) != str(err):
                return err
        else:
            return err
    return RunnerError(f"job file {job.source}: {err}")


def _blame(path: str, raw: dict, overrides, err: RunnerError) -> str:
    """``err``'s message, naming the job file if the file fails the same way
    without the overrides."""
    if overrides:
        try:
            _job(copy.deepcopy(raw), ())
        except RunnerError as alone:
            if str(alone) != str(err):
                return str(err)
        else:
            return str(err)
    return f"job file {path}: {err}"


def _read_job_file(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            raw = _yaml(f)
    except FileNotFoundError:
        raise RunnerError(f"job file {path}: no such file") from None
    except IsADirectoryError:
        raise RunnerError(f"job file {path}: is a folder, not a file") from None
    except UnicodeDecodeError:
        raise RunnerError(f"job file {path}: not UTF-8 text") from None
    except yaml.YAMLError as err:
        raise RunnerError(f"job file {path}: not valid YAML "
                          f"{_yaml_problem(err)}") from err
    if raw is None:
        raise RunnerError(f"job file {path}: empty; a job needs at least `stages:`")
    if not isinstance(raw, dict):
        raise RunnerError(f"job file {path}: expected a mapping at the top")
    return raw


def _job(raw: dict, overrides) -> JobConfig:
    for assignment in overrides:
        _apply_override(raw, assignment)
    job = _build(JobConfig, raw, "job").validate()
    job.data.root = os.path.abspath(job.data.root)
    # Trials run in folders of their own: a relative path must not follow
    # them there.
    first = job.stages[0]
    if first.init and "://" not in first.init:
        first.init = os.path.abspath(first.init)
    first.model = _spec_path(first.model)
    for stage in job.stages[1:]:
        for variant in stage.variants:
            if "to" in variant:
                variant["to"] = _spec_path(variant["to"])
    return job


def _spec_path(model):
    """A model given as a spec JSON file, made absolute; a spec name as is."""
    if isinstance(model, str) and model.endswith(".json") and os.path.isfile(model):
        return os.path.abspath(model)
    return model

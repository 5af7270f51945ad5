"""``runner doctor``: check what a run needs before it starts.

Each check is a small function of a shared :class:`Context` that returns
``(status, text)`` lines: ``ok``, ``warn`` (worth knowing, the run can go
ahead) or ``FAIL`` (the run would stop or hang; the text says what is wrong,
naming the file or setting, and what to do). :func:`run` prints them in
order, one line each, and returns 0 when nothing failed, 1 otherwise. A check
that raises is reported as a failed line, never as a traceback.

The checks lean on the code a run uses, so they judge what the run would
judge: ``config.load_job`` for the job file, ``cluster.find_address`` for
which Ray to join and ``cluster.check_reachable`` for its port (the probe
``runner grow`` makes too), ``storage.check_writable`` for the storage root,
``ingest.check_layout`` for the data folder (files are listed, none decoded),
``checkpoint.load_checkpoint`` for a first stage's ``init:`` checkpoint,
``resources.plan`` for the CPU split and ``train.loop.worker_env`` for the
training workers' thread count.

Doctor never starts a Ray cluster. With no cluster to join it says that
``runner grow`` will start a local one and sizes the CPU plan for that
(``ray.num_cpus`` or all CPUs here); with one, it joins as a driver, reads its
CPUs, nodes and dashboard address, and leaves again. It joins the way
``cluster.connect`` does: a cluster found running on this machine through
``"auto"``, so Ray sends the cluster's auth token.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from importlib import metadata
from typing import TYPE_CHECKING

from runner.errors import RunnerError

if TYPE_CHECKING:
    from runner.config import JobConfig
    from runner.model import ModelSpec

OK, WARN, FAIL = "ok", "warn", "FAIL"
PINNED = ("torch", "torchvision", "ray")
MIN_FREE_BYTES = 1 << 30   # the default job's run folder is about 0.4 GB
HTTP_TIMEOUT_S = 5         # dashboard / job server probe
GIB = 1 << 30

Check = tuple[str, str]


@dataclass
class Cluster:
    """What doctor read from a running Ray cluster."""

    address: str
    cpus: float
    nodes: list[tuple[str, float]]       # (node address, CPUs) of live nodes
    cpu_nodes: int                       # live nodes with CPUs, as a run counts
    dashboard: str                       # host:port, "" when it has none
    local_object_store: int | None       # bytes, the node on this machine


@dataclass
class Context:
    job_path: str | None = None
    overrides: list[str] = field(default_factory=list)
    address: str | None = None           # --address
    job: JobConfig | None = None         # once the job file parsed
    cluster: Cluster | None = None
    cpus: float | None = None            # what the CPU plan is sized for
    cpu_nodes: int = 1
    cpus_source: str = ""
    init_spec: ModelSpec | None = None   # once an init: checkpoint loaded


# --- environment ------------------------------------------------------------------


def check_versions(ctx: Context) -> list[Check]:
    """Python, torch, torchvision and ray, against what runner requires."""
    found, lines = [f"Python {platform.python_version()}"], []
    wanted = _requirements()
    python = wanted.get("python")
    if python is not None and not python.contains(platform.python_version()):
        lines.append((FAIL, (f"Python {platform.python_version()}: runner needs "
                             f"Python {python}; make the venv with such a Python")))
    for name in PINNED:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            lines.append((FAIL, (f"{name} is not installed: run "
                                 "`.venv/bin/pip install -e .` in the project")))
            continue
        found.append(f"{name} {version}")
        spec = wanted.get(name)
        if spec is not None and not spec.contains(version, prereleases=True):
            lines.append((WARN, (f"{name} {version} is installed but runner pins "
                                 f"{name}{spec}: run `.venv/bin/pip install -e .`")))
    return [(OK, ", ".join(found)), *lines]


def _requirements() -> dict:
    """name -> SpecifierSet of runner's installed metadata ({} from a source
    tree that was never installed)."""
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    try:
        meta = metadata.metadata("runner")
        requires = metadata.requires("runner") or []
    except metadata.PackageNotFoundError:
        return {}
    wanted = {"python": SpecifierSet(meta.get("Requires-Python") or "")}
    for text in requires:
        req = Requirement(text)
        if req.marker is None and req.name in PINNED:
            wanted[req.name] = req.specifier
    return wanted


def check_threads(ctx: Context) -> list[Check]:
    """torch's thread count here against the machine's CPUs."""
    import torch
    threads, cpus = torch.get_num_threads(), os.cpu_count() or 1
    text = f"torch uses {threads} threads; this machine has {cpus} CPUs"
    if threads > cpus:
        return [(WARN, (f"{text}: more threads than cores slows every step; unset "
                        f"OMP_NUM_THREADS or set it to {cpus} or less"))]
    return [(OK, text)]


# --- the job file -----------------------------------------------------------------


def check_job(ctx: Context) -> list[Check]:
    from runner.config import load_job
    if not ctx.job_path:
        ignored = " (--set ignored)" if ctx.overrides else ""
        return [(WARN, ("no job file given: storage, data and CPU-plan checks "
                        f"skipped{ignored}; run `runner doctor jobs/cats_dogs.yaml`"))]
    try:
        ctx.job = load_job(ctx.job_path, ctx.overrides)
    except RunnerError as err:
        text = str(err)
        if not text.startswith("job file"):
            text = f"job file {ctx.job_path}: {text}"
        return [(FAIL, f"{text}; fix the file or the --set value")]
    stages = ", ".join(s.name for s in ctx.job.stages)
    return [(OK, (f"job file {ctx.job_path}: job {ctx.job.name!r}, "
                  f"{len(ctx.job.stages)} stages ({stages})"))]


# --- Ray --------------------------------------------------------------------------


def check_ray(ctx: Context) -> list[Check]:
    """Which cluster a run would use, and what it has; never starts one."""
    from runner import cluster
    configured, where = _configured_address(ctx)
    try:
        address = cluster.find_address(configured)
    except RunnerError as err:
        return [(FAIL, str(err))]
    found = bool(address) and not configured and \
        address != os.environ.get("RAY_ADDRESS")
    if address and not configured:
        where = "found running on this machine" if found else "RAY_ADDRESS"
    if not address:
        return _no_cluster(ctx)
    if address.startswith(("http://", "https://")):
        return _job_server_only(address, where)
    try:
        cluster.check_reachable(address, where)
    except RunnerError as err:
        return [(FAIL, str(err))]
    try:
        # As runner.cluster.connect does: "auto" for the one local cluster
        # found here, so Ray sends its auth token (~/.ray/auth_token), which
        # it does not for an explicit address unless RAY_AUTH_MODE=token.
        ctx.cluster = _join("auto" if found else address)
    except Exception as err:  # Ray raises several kinds when it cannot join
        return [(FAIL, (f"cannot join Ray at {address} ({where}): "
                        f"{type(err).__name__}: {err}; {_join_hint()}check that it "
                        "runs the same Ray version, or fix the address"))]
    found = ctx.cluster
    ctx.cpus, ctx.cpus_source = found.cpus, "the running cluster"
    ctx.cpu_nodes = found.cpu_nodes
    nodes = ", ".join(f"{addr} ({cpus:g} CPUs)" for addr, cpus in found.nodes)
    summary = (f"Ray cluster at {found.address} ({where}): {found.cpus:g} CPUs on "
               f"{_n(len(found.nodes), 'node')}")
    if found.cpus <= 0:
        return [(FAIL, f"{summary}: no CPUs to train on; add nodes with CPUs")]
    return [(OK, summary), (OK, f"Ray nodes: {nodes}")]


def _configured_address(ctx: Context) -> tuple[str | None, str]:
    if ctx.address:
        return ctx.address, "--address"
    job_address = ctx.job.ray.address if ctx.job is not None else None
    return job_address, f"ray.address in {ctx.job_path}"


def _no_cluster(ctx: Context) -> list[Check]:
    wanted = ctx.job.ray.num_cpus if ctx.job is not None else None
    ctx.cpus = wanted or os.cpu_count() or 1
    ctx.cpus_source = ("ray.num_cpus" if wanted else "all CPUs here") + \
        ", the local Ray `runner grow` would start"
    return [(OK, ("no Ray cluster running; `runner grow` will start a local one "
                  f"with {ctx.cpus:g} CPUs"))]


def _job_server_only(address: str, where: str) -> list[Check]:
    status, text = _probe_dashboard(address)
    if status == FAIL:
        return [(FAIL, f"{text} ({where}); start the cluster or fix the address")]
    return [(status, (f"{text} ({where}); it takes jobs through `ray job submit`, "
                      "and their CPU plan is checked when they start there"))]


def _join_hint() -> str:
    # Ray turns token auth on by default for the clusters it starts, but a
    # driver given an explicit address only sends the token when told to.
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        return ""
    return ("if the cluster uses token auth (Ray's default), set "
            "RAY_AUTH_MODE=token (the token is ~/.ray/auth_token); ")


def _join(address: str) -> Cluster:
    """Join the cluster as a driver just long enough to read it."""
    import ray
    if ray.is_initialized():  # a caller already holds a connection: read that
        return _describe(ray, _current_dashboard())
    context = ray.init(address=address, logging_level=logging.WARNING,
                       log_to_driver=False)
    try:
        return _describe(ray, context.dashboard_url or "")
    finally:
        ray.shutdown()


def _current_dashboard() -> str:
    try:
        from ray._private.worker import _global_node
        return _global_node.address_info.get("webui_url") or ""
    except Exception:  # a private attribute of Ray's
        return ""


def _describe(ray, dashboard: str) -> Cluster:
    from runner.cluster import cpu_nodes
    alive = [n for n in ray.nodes() if n.get("Alive")]
    nodes = [(n["NodeManagerAddress"], n["Resources"].get("CPU", 0.0))
             for n in alive]
    here = ray.get_runtime_context().get_node_id()
    stores = [n["Resources"].get("object_store_memory") for n in alive
              if n.get("NodeID") == here]
    return Cluster(address=ray.get_runtime_context().gcs_address,
                   cpus=ray.cluster_resources().get("CPU", 0.0), nodes=nodes,
                   cpu_nodes=cpu_nodes(),
                   dashboard=dashboard,
                   local_object_store=int(stores[0]) if stores and stores[0] else None)


def check_dashboard(ctx: Context) -> list[Check]:
    """A joined cluster's dashboard and job server: `ray job submit` goes
    through it, and Ray Train frees a stopped trial's CPUs through its state
    API."""
    if ctx.cluster is None:
        return []
    if not ctx.cluster.dashboard:
        return [(FAIL, (f"the Ray cluster at {ctx.cluster.address} runs no dashboard: "
                        "runs that stop trials early would wait forever for their "
                        "CPUs; restart it with `ray start --head --include-dashboard "
                        "true --dashboard-host 127.0.0.1`"))]
    status, text = _probe_dashboard(ctx.cluster.dashboard)
    if status == FAIL:
        text += "; check that the dashboard process runs and its port is open"
    return [(status, text)]


def _probe_dashboard(address: str) -> Check:
    url = address if "://" in address else f"http://{address}"
    url = url.rstrip("/")
    request = urllib.request.Request(f"{url}/api/version", headers=_auth_headers())
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as r:
            version = json.loads(r.read()).get("ray_version", "?")
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            return (WARN, (f"dashboard / job server at {url} asks for a token: set "
                           "RAY_AUTH_MODE=token (the token is ~/.ray/auth_token)"))
        return (FAIL, f"dashboard / job server at {url} answered HTTP {err.code}")
    except (OSError, ValueError) as err:
        reason = getattr(err, "reason", None) or err
        return (FAIL, f"dashboard / job server at {url} does not answer ({reason})")
    local = _version("ray")
    if local and version != local:
        return (WARN, (f"dashboard / job server at {url} runs Ray {version}, this "
                       f"machine has {local}: install ray=={version} here"))
    return (OK, f"dashboard / job server at {url} answers (Ray {version})")


def _auth_headers() -> dict:
    """The token header Ray's own HTTP clients send (RAY_AUTH_MODE=token)."""
    try:
        from ray._private.authentication.http_token_authentication import (
            get_auth_headers_if_auth_enabled,
        )
        return get_auth_headers_if_auth_enabled({})
    except Exception:  # a private helper of Ray's: probe without a token
        return {}


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


# --- storage and data --------------------------------------------------------------


def check_storage(ctx: Context) -> list[Check]:
    """The storage root takes a write (folders doctor made for the probe are
    removed again); free space there when it is local."""
    from runner import storage
    if ctx.job is None:
        return []
    root = storage.resolve(ctx.job.storage)
    made = _first_missing(root.path) if root.is_local else None
    try:
        storage.check_writable(root)
    except RunnerError as err:
        return [(FAIL, (f"{err}; set storage in {ctx.job_path} (or --set "
                        "storage=PATH) to a folder you can write"))]
    finally:
        if made:
            _remove_empty(root.path, made)
    if not root.is_local:
        return [(OK, f"storage root {root.uri} writable")]
    free = shutil.disk_usage(_existing(root.path)).free
    text = f"storage root {root.uri} writable; {free / GIB:.1f} GiB free"
    if free < MIN_FREE_BYTES:
        return [(WARN, (f"{text}: the default job's run folder takes about 0.4 GB; "
                        "free some space or set storage elsewhere"))]
    return [(OK, text)]


def check_resume(ctx: Context) -> list[Check]:
    """A run already under the storage root is one this job may resume: the
    same refusal `runner grow` gives before it touches anything."""
    from runner.growth.loop import check_resume as refuse_changed
    if ctx.job is None:
        return []
    try:
        refuse_changed(ctx.job)
    except RunnerError as err:
        return [(FAIL, str(err))]
    return []


def _existing(path: str) -> str:
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def _first_missing(path: str) -> str | None:
    """The outermost folder of ``path`` that does not exist yet, if any."""
    missing = None
    while not os.path.lexists(path):
        missing, path = path, os.path.dirname(path)
    return missing


def _remove_empty(path: str, top: str) -> None:
    """Remove ``path`` and its parents up to ``top`` while they are empty."""
    while True:
        try:
            os.rmdir(path)
        except OSError:
            return
        if path == top:
            return
        path = os.path.dirname(path)


def check_data(ctx: Context) -> list[Check]:
    """The data folder's layout and image files per class (counted by name,
    none decoded); a class folder with no file named like an image warns."""
    from runner.data.ingest import SPLITS, check_layout
    if ctx.job is None:
        return []
    try:
        layout = check_layout(ctx.job.data.root)
    except RunnerError as err:
        return [(FAIL, f"{err}; fix the folder or data.root in {ctx.job_path}")]
    images = layout["images"]
    splits = "; ".join(f"{split} " + ", ".join(f"{c} {n}" for c, n in counts.items())
                       for split, counts in images.items())
    others = _total(layout["counts"]) - _total(images)
    notes = [f"{_n(others, 'other file')} (kept only if it decodes as an image)"
             if others else "",
             f"{layout['skipped']} entries ignored" if layout["skipped"] else ""]
    text = f"data {layout['root']}: image files per class: {splits}" + "".join(
        f"; {note}" for note in notes if note)
    empty = [os.path.join(layout["root"], SPLITS[split], c)
             for split, counts in images.items() for c, n in counts.items() if not n]
    if empty:
        return [(WARN, (f"{text}: no file named like an image (.jpg, .png, ...) in "
                        f"{', '.join(empty)}; ingest will fail there unless those "
                        f"files decode; fix the folder or data.root in "
                        f"{ctx.job_path}"))]
    return [(OK, text)]


def _total(counts: dict) -> int:
    return sum(n for per_class in counts.values() for n in per_class.values())


def check_init(ctx: Context) -> list[Check]:
    """The first stage's ``init:`` checkpoint, when the job starts from one:
    it exists and loads as the run would load it (checksum, tensors only,
    weights that fit its spec)."""
    from runner import storage
    from runner.evaluate import load_model
    from runner.model.checkpoint import load_checkpoint
    from runner.model import num_params
    if ctx.job is None or not ctx.job.stages or not ctx.job.stages[0].init:
        return []
    init = ctx.job.stages[0].init
    fix = f"fix stages[0].init ({ctx.job.stages[0].name}) in {ctx.job_path}"
    loc = storage.resolve(init)
    if not storage.exists(loc):
        return [(FAIL, f"init checkpoint {init}: no such folder; {fix}")]
    with tempfile.TemporaryDirectory() as tmp:
        local = storage.download_dir(loc, tmp)
        try:
            spec, state, _ = load_checkpoint(local)
            load_model(spec, state, loc.uri)
        except RunnerError as err:
            text = str(err).replace(local, loc.uri)
            return [(FAIL, f"init checkpoint {init}: {text}; {fix}")]
    ctx.init_spec = spec
    return [(OK, (f"init checkpoint {loc.uri}: {spec.name}, "
                  f"{num_params(spec):,} parameters, loads"))]


def check_growth(ctx: Context) -> list[Check]:
    """Every variant of every stage builds from what the stage before may
    hand on, on paper (the growth ops on zero weights, as ``runner grow``
    checks before it starts). Skipped when an ``init:`` checkpoint did not
    load: its line above says why."""
    from runner.growth.loop import check_growth as grow_on_paper
    job = ctx.job
    if job is None or not job.stages or (job.stages[0].init and ctx.init_spec is None):
        return []
    try:
        grow_on_paper(job, ctx.init_spec)  # the loaded init: spec, if any
    except RunnerError as err:
        return [(FAIL, f"{err}; fix it in {ctx.job_path}")]
    variants = sum(len(s.variants) for s in job.stages[1:])
    return [(OK, f"growth: all {variants} variants of {len(job.stages) - 1} "
                 "growth stages build, checked on paper")]


# --- CPUs and memory --------------------------------------------------------------


def check_plan(ctx: Context) -> list[Check]:
    """The trial's CPU split fits the cluster, and each training worker runs
    as many threads as CPUs it reserves (to within the fraction of a core
    that ``resources.plan`` rounds away)."""
    from runner import resources
    from runner.train.loop import worker_env
    if ctx.job is None:
        return []
    if ctx.cpus is None:
        return [(WARN, ("CPU plan not checked: the cluster's CPUs are unknown "
                        "(see the Ray line above)"))]
    try:
        p = resources.plan(ctx.job, ctx.cpus, ctx.cpu_nodes)
    except RunnerError as err:
        return [(FAIL, f"CPU plan ({ctx.cpus_source}): {err}")]
    plan_text = (f"CPU plan: {_n(p.workers, 'training worker')} x "
                 f"{p.cpus_per_worker:g} CPUs x {_n(p.threads_per_worker, 'thread')} "
                 f"(batch {p.batch_size} = {p.workers} x {p.batch_per_worker}) "
                 f"+ {p.aug_cpus:g} CPUs of augmentation ({_n(p.aug_tasks, 'task')} at a time)"
                 f" = {p.trial_cpus:g} of {ctx.cpus:g} CPUs ({ctx.cpus_source})")
    omp = worker_env(p.threads_per_worker)["OMP_NUM_THREADS"]
    threads = (f"each training worker runs {_n(int(omp), 'thread')} "
               f"(OMP_NUM_THREADS={omp}) on {p.cpus_per_worker:g} reserved CPUs")
    if abs(float(omp) - p.cpus_per_worker) < 1:
        return [(OK, plan_text), (OK, threads)]
    how = ("more threads than CPUs, so the workers compete for cores"
           if float(omp) > p.cpus_per_worker else "whole reserved cores idle")
    return [(OK, plan_text),
            (WARN, (f"{threads}: {how}; set train.cpus_per_worker (and "
                    f"train.workers / augment.cpus) in {ctx.job_path} so each "
                    "worker reserves whole CPUs"))]


def check_precision(ctx: Context) -> list[Check]:
    """What ``train.precision`` comes to on this machine (each worker decides
    ``auto`` on its own node's CPU)."""
    from runner.train import precision
    if ctx.job is None:
        return []
    text = f"training precision here: {precision.describe(ctx.job.train.precision)}"
    if precision.resolve(ctx.job.train.precision) == "bf16" and not precision.native_bf16()[0]:
        return [(WARN, f"{text}; set train.precision to auto or fp32 in {ctx.job_path}")]
    return [(OK, text)]


def _n(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def check_shm(ctx: Context) -> list[Check]:
    """/dev/shm against the object store Ray keeps there."""
    if not os.path.isdir("/dev/shm"):
        return [(OK, ("no /dev/shm here: Ray keeps its object store in its temp "
                      "folder"))]
    stat = os.statvfs("/dev/shm")
    size, free = stat.f_blocks * stat.f_frsize, stat.f_bavail * stat.f_frsize
    running = ctx.cluster is not None and ctx.cluster.local_object_store
    store = ctx.cluster.local_object_store if running else _default_store()
    room = size if running else free  # a running store already took its space
    text = f"/dev/shm {size / GIB:.1f} GiB ({free / GIB:.1f} GiB free)"
    if store is None:
        return [(OK, text)]
    if room < store:
        return [(WARN, (f"{text} is smaller than Ray's object store "
                        f"({store / GIB:.1f} GiB): Ray moves it to /tmp, which is "
                        "slower (or refuses to start above 10 GB); in Docker run "
                        f"with --shm-size={store * 1.1 / GIB:.1f}gb, or start Ray "
                        "with a smaller --object-store-memory"))]
    return [(OK, f"{text} holds Ray's object store ({store / GIB:.1f} GiB)")]


def _default_store() -> int | None:
    """The object store Ray would size for a node started here."""
    try:
        from ray._private import utils
        return utils.resolve_object_store_memory(utils.estimate_available_memory())
    except Exception:  # private helpers of Ray's: skip the comparison
        return None


# --- the runner -------------------------------------------------------------------

CHECKS = (check_versions, check_threads, check_job, check_ray, check_dashboard,
          check_storage, check_resume, check_data, check_init, check_growth, check_plan,
          check_precision, check_shm)


def run(job_path: str | None = None, overrides: list[str] = (),
        address: str | None = None, emit=print) -> int:
    """Run every check, ``emit`` one line each; 0 if none failed, else 1."""
    ctx = Context(job_path=job_path, overrides=list(overrides), address=address)
    failed = False
    for check in CHECKS:
        for status, text in _safe(check, ctx):
            emit(f"{status:<4} {text}")
            failed |= status == FAIL
    return 1 if failed else 0


def _safe(check, ctx: Context) -> list[Check]:
    try:
        return check(ctx)
    except Exception as err:  # one broken check must not hide the others
        name = check.__name__.removeprefix("check_")
        return [(FAIL, f"{name} check could not run: {type(err).__name__}: {err}")]

"""Connecting to Ray: a given address, the job's cluster, or a local one.

Under ``ray job submit`` the job supervisor sets RAY_ADDRESS and we join that
cluster. Otherwise ``ray.address`` in the job (or ``--address``) names one,
and with nothing set we join the one Ray already running on this machine (a
``ray start --head``), or start a private local Ray with ``ray.num_cpus``
CPUs when there is none. A given ``host:port`` is probed first (one TCP
connect, :func:`check_reachable`, which ``runner doctor`` uses too): Ray
itself would retry a dead address for minutes before giving up.

Why not start a second cluster beside a running one: Ray Train frees the CPUs
of a trial that Tune stopped early through Ray's state API, which cannot tell
two clusters on one machine apart; the freed CPUs would never come back and
the next trial would wait forever.
"""

from __future__ import annotations

import logging
import os
import socket

import ray

from runner.config import JobConfig
from runner.errors import RunnerError

log = logging.getLogger(__name__)

IDLE_WORKERS_ENV = "RAY_num_workers_soft_limit"  # read by the raylet at start
CONNECT_TIMEOUT_S = 3  # TCP probe of a Ray address before joining it


def _running() -> str | None:
    """The address of the one Ray cluster running on this machine, if any."""
    try:
        from ray._private.services import find_gcs_addresses
        found = sorted(find_gcs_addresses())
    except Exception:  # a private helper of Ray's: never let it stop a run
        return None
    if len(found) > 1:
        raise RunnerError(
            f"several Ray clusters run on this machine ({', '.join(found)}); "
            "choose one with --address (or ray.address in the job)")
    if found:
        log.info("joining the Ray cluster already running at %s", found[0])
    return found[0] if found else None


def find_address(configured: str | None = None) -> str | None:
    """The cluster to join: ``configured`` (``--address`` or ``ray.address``),
    else RAY_ADDRESS, else the one Ray running on this machine; None when
    there is none (and a private local Ray would be started). Starts nothing."""
    return configured or os.environ.get("RAY_ADDRESS") or _running()


def check_reachable(address: str | None, where: str) -> None:
    """Refuse at once, naming ``address`` and where it was given (``where``),
    when it lacks a port, has a port that is no number, or nothing listens
    there: ``ray.init`` would fail on such an address only after the data is
    ingested, or retry it for minutes. Forms Ray resolves itself ("auto",
    "local", None) pass unprobed."""
    host, sep, port = (address or "").split("://")[-1].rstrip("/").rpartition(":")
    if not sep:
        if address and address not in ("auto", "local"):
            raise RunnerError(f"Ray address {address} ({where}): no port; give it "
                              "as HOST:PORT (e.g. 127.0.0.1:6379), or auto")
        return
    if not (port.isdigit() and 0 < int(port) < 65536):
        raise RunnerError(f"Ray address {address} ({where}): {port!r} is not a "
                          "port number (1-65535); fix the address")
    try:
        socket.create_connection((host.strip("[]"), int(port)),
                                 CONNECT_TIMEOUT_S).close()
    except OSError as err:
        reason = err.strerror or str(err) or type(err).__name__
        raise RunnerError(f"cannot reach Ray at {address} ({where}): {reason}; "
                          "start it with `ray start --head` or fix the "
                          "address") from None


def check_address(job: JobConfig, where: str = "ray.address") -> None:
    """:func:`check_reachable` for the address a run of ``job`` is given
    (``ray.address``, set by ``--address`` too, else RAY_ADDRESS)."""
    if job.ray.address:
        check_reachable(job.ray.address, where)
    else:
        check_reachable(os.environ.get("RAY_ADDRESS"), "RAY_ADDRESS")


def connect(job: JobConfig) -> float:
    """Make sure Ray is up; return the cluster's CPU count."""
    if not ray.is_initialized():
        check_address(job)
        address = find_address(job.ray.address)
        if address and not (job.ray.address or os.environ.get("RAY_ADDRESS")):
            # The one local cluster, found by us: "auto" makes Ray attach the
            # cluster's auth token (~/.ray/auth_token), which it does not for
            # an explicit address unless RAY_AUTH_MODE=token is set.
            address = "auto"
        kwargs = {} if address else {"num_cpus": job.ray.num_cpus}
        if not address:
            warn_oversubscribed(job.ray.num_cpus)
            keep_idle_workers(local_cpus(job))
        # The driver prints its own progress line per epoch (runner.growth.
        # progress); the workers' own output stays in Ray's log files
        # (logs_dir) instead of flooding the console.
        ray.init(address=address, logging_level=logging.WARNING,
                 log_to_driver=False, **kwargs)
    cpus = ray.cluster_resources().get("CPU", 0.0)
    if cpus <= 0:
        raise RunnerError("the Ray cluster has no CPUs to train on")
    log.info("Ray cluster at %s: %g CPUs on %d node(s)%s",
             ray.get_runtime_context().gcs_address, cpus,
             len([n for n in ray.nodes() if n["Alive"]]), _dashboard())
    return cpus


def local_cpus(job: JobConfig) -> int:
    """CPUs of the local Ray a run of ``job`` starts when it joins none."""
    return job.ray.num_cpus or os.cpu_count() or 1


def warn_oversubscribed(num_cpus: int | None) -> None:
    """Say so when a Ray we start is told of more CPUs than the machine has:
    Ray then schedules that many CPUs' worth of workers on fewer cores."""
    cores = os.cpu_count() or 1
    if num_cpus and num_cpus > cores:
        log.warning("ray.num_cpus %d is more than this machine's %d cores: trials "
                    "are planned for %d CPUs and their workers will share the "
                    "cores, each step slower", num_cpus, cores, num_cpus)


def _dashboard() -> str:
    """", dashboard at http://..." when this driver knows the Ray dashboard."""
    try:
        from ray._private.worker import _global_node
        url = _global_node.address_info.get("webui_url") if _global_node else None
    except (ImportError, AttributeError):
        url = None
    return f", dashboard at http://{url}" if url else ""


def keep_idle_workers(cpus: int) -> None:
    """Let a Ray we start keep more idle worker processes than it has CPUs.

    Ray kills idle workers beyond a soft limit that defaults to the CPU count.
    A trial already holds more processes than a small machine has CPUs
    (trial driver, Ray Train controller and workers, Ray Data's coordinator),
    so every augmentation task would otherwise get a new process that first
    imports torch: measured on 2 CPUs, a third of the trainers' time went to
    waiting and the epoch ran at half speed. For a ``ray start`` cluster, set
    the same variable before ``ray start`` (cluster.yaml does).
    """
    os.environ.setdefault(IDLE_WORKERS_ENV, str(max(8, 2 * cpus)))


def logs_dir() -> str | None:
    """Where this machine's Ray session keeps its log files (every worker's
    output, Ray Train's and Tune's own lines), or None if Ray does not say."""
    try:
        from ray._private.worker import _global_node
        return _global_node.get_logs_dir_path() if _global_node else None
    except Exception:  # a private attribute of Ray's: never let it stop a run
        return None


def cpu_nodes() -> int:
    """Nodes of the connected cluster that are alive and have CPUs."""
    return max(1, sum(1 for n in ray.nodes()
                      if n["Alive"] and n["Resources"].get("CPU", 0) > 0))

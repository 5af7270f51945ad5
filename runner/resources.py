"""How a trial's CPUs are split between training workers and augmentation.

Ray Train reserves its workers' CPUs for the whole trial and Ray Data may only
schedule augmentation on what is left; if nothing is left the data stream
never starts and the trainers wait forever. So the split is decided here,
before anything is launched, and a job that cannot fit stops at once with the
numbers.

Default on a cluster of N nodes with C CPUs in all:

- a tenth of the CPUs, at least half a CPU, reserved for augmentation, which
  costs about a tenth of a training step per image (bench/throughput.py);
- one single-threaded training worker per whole core of the rest, on every
  node (``train.workers`` unset). For networks of this size torch's threads
  scale poorly inside one step (two threads are about 1.5 times one), and
  worse when anything else needs a core for a moment: every parallel region
  then waits for its slowest thread. Data-parallel processes of one thread
  each pay a gradient all-reduce per step instead, a few milliseconds over
  loopback, and a process that loses its core for a while delays only that
  step. On 2 CPUs: two workers of 0.75 CPUs with a thread each, beside 0.5
  CPUs of augmentation, which uses far less than its reservation;
- each worker reserves an equal share of the training CPUs and runs that many
  torch threads, rounded to the nearest whole core, so cores are
  oversubscribed by at most the fractional part of a reservation;
- ``train.batch_size`` is the global batch: each worker takes an equal part,
  so the optimisation does not change with the number of workers;
- augmentation tasks are sized to fit in what the workers leave free on a
  node (Ray Train spreads the workers evenly), so they always find a place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from runner.config import JobConfig
from runner.errors import RunnerError

AUG_SHARE = 0.1           # of the cluster's CPUs, when augment.cpus is not set
MIN_AUG_CPUS = 0.5
MIN_WORKER_CPUS = 0.25    # below this a worker is starved, not parallel
AUG_TASK_CPUS = 0.5       # each augmentation task's reservation, at most
MIN_TASK_CPUS = 0.05


@dataclass(frozen=True)
class Plan:
    workers: int
    cpus_per_worker: float
    threads_per_worker: int
    batch_per_worker: int
    aug_cpus: float
    aug_tasks: int
    task_cpus: float

    @property
    def trial_cpus(self) -> float:
        return self.workers * self.cpus_per_worker + self.aug_cpus

    @property
    def batch_size(self) -> int:
        """The global batch, as the workers' equal parts add up."""
        return self.workers * self.batch_per_worker


def plan(job: JobConfig, cluster_cpus: float, nodes: int = 1) -> Plan:
    """Size one trial for a cluster of ``nodes`` nodes with ``cluster_cpus``
    CPUs in all (assumed alike), or explain why it cannot run."""
    aug = job.augment.cpus or max(MIN_AUG_CPUS, AUG_SHARE * cluster_cpus)
    train_cpus = cluster_cpus - aug
    workers = job.train.workers or _default_workers(
        train_cpus / nodes, job.train.cpus_per_worker, nodes)
    per_worker = job.train.cpus_per_worker or _floor2(train_cpus / workers)
    need = workers * max(per_worker, MIN_WORKER_CPUS) + aug
    if per_worker < MIN_WORKER_CPUS or need > cluster_cpus + 1e-9:
        raise RunnerError(
            f"a trial needs {need:g} CPUs ({workers} training "
            f"worker{'s' if workers != 1 else ''} x "
            f"{max(per_worker, MIN_WORKER_CPUS):g} + {aug:g} for augmentation) but "
            f"the Ray cluster has {cluster_cpus:g}: lower train.workers, "
            f"train.cpus_per_worker or augment.cpus, or add nodes")
    node_cpus = cluster_cpus / nodes
    if per_worker > node_cpus + 1e-9:
        raise RunnerError(
            f"a training worker needs {per_worker:g} CPUs but a node has "
            f"{node_cpus:g}: raise train.workers or lower train.cpus_per_worker")
    task_cpus = _task_cpus(node_cpus - (workers // nodes) * per_worker, aug)
    tasks = max(1, int(aug / task_cpus + 1e-9))
    threads = max(1, math.floor(per_worker + 0.5))
    batch = max(1, round(job.train.batch_size / workers))
    return Plan(workers, per_worker, threads, batch, aug, tasks, task_cpus)


def _default_workers(node_train_cpus: float, cpus_per_worker: float | None,
                     nodes: int) -> int:
    """As many workers per node as whole cores (or ``cpus_per_worker``
    reservations) fit in a node's share of the training CPUs, at least one."""
    if cpus_per_worker:
        per_node = math.floor(node_train_cpus / cpus_per_worker + 1e-9)
    else:
        per_node = math.floor(node_train_cpus + 0.5)
    return nodes * max(1, per_node)


def _task_cpus(node_spare: float, aug: float) -> float:
    """One augmentation task's reservation: AUG_TASK_CPUS, or less where the
    augmentation share, or what the workers leave free on the least loaded
    node, is smaller."""
    if aug < MIN_TASK_CPUS - 1e-9:
        raise RunnerError(f"augment.cpus {aug:g} is too little: augmentation "
                          f"needs at least {MIN_TASK_CPUS:g} CPUs")
    if node_spare < MIN_TASK_CPUS - 1e-9:
        raise RunnerError(
            f"the training workers leave {max(node_spare, 0):g} CPUs free on a "
            f"node, too little for augmentation (at least {MIN_TASK_CPUS:g}): "
            "lower train.cpus_per_worker or train.workers")
    return _floor2(min(AUG_TASK_CPUS, aug, node_spare))


def _floor2(x: float) -> float:
    return math.floor(x * 100 + 1e-9) / 100

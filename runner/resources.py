"""How a trial's CPUs are split between training workers and augmentation.

Ray Train reserves its workers' CPUs for the whole trial and Ray Data may only
schedule augmentation on what is left; if nothing is left the data stream
never starts and the trainers wait forever. So the split is decided here,
before anything is launched, and a job that cannot fit stops at once with the
numbers.

Default on a cluster of N nodes with C CPUs in all:

- one training worker per node (``train.workers`` unset): inside a node,
  torch's threads share the cores with no gradient exchange at all, while
  two data-parallel processes on one node pay an all-reduce every step and
  run one thread each;
- a tenth of the CPUs, at least half a CPU, reserved for augmentation, which
  costs about a tenth of a training step per image (bench/throughput.py);
- each training worker reserves an equal share of the rest, and runs that
  many torch threads, rounded to the nearest whole core. On 2 CPUs: one
  worker of 1.5 CPUs with 2 threads, beside 0.5 CPUs of augmentation that
  uses far less than its reservation; so cores are oversubscribed by at most
  the fractional part of a reservation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from runner.config import JobConfig
from runner.data.pipeline import READ_CPUS
from runner.errors import RunnerError

AUG_SHARE = 0.1           # of the cluster's CPUs, when augment.cpus is not set
MIN_AUG_CPUS = 0.5
MIN_WORKER_CPUS = 0.25    # below this a worker is starved, not parallel
AUG_TASK_CPUS = 0.5       # each augmentation task's reservation


@dataclass(frozen=True)
class Plan:
    workers: int
    cpus_per_worker: float
    threads_per_worker: int
    aug_cpus: float
    aug_tasks: int

    @property
    def trial_cpus(self) -> float:
        return self.workers * self.cpus_per_worker + self.aug_cpus


def plan(job: JobConfig, cluster_cpus: float, nodes: int = 1) -> Plan:
    """Size one trial for a cluster of ``nodes`` nodes with ``cluster_cpus``
    CPUs in all (assumed alike), or explain why it cannot run."""
    workers = job.train.workers or nodes
    aug = job.augment.cpus or max(MIN_AUG_CPUS, AUG_SHARE * cluster_cpus)
    per_worker = job.train.cpus_per_worker or (cluster_cpus - aug) / workers
    per_worker = math.floor(per_worker * 100) / 100
    need = workers * max(per_worker, MIN_WORKER_CPUS) + aug
    if per_worker < MIN_WORKER_CPUS or need > cluster_cpus + 1e-9:
        raise RunnerError(
            f"a trial needs {need:g} CPUs ({workers} training workers x "
            f"{max(per_worker, MIN_WORKER_CPUS):g} + {aug:g} for augmentation) but "
            f"the Ray cluster has {cluster_cpus:g}: lower train.workers, "
            f"train.cpus_per_worker or augment.cpus, or add nodes")
    node_cpus = cluster_cpus / nodes
    if per_worker > node_cpus + 1e-9:
        raise RunnerError(
            f"a training worker needs {per_worker:g} CPUs but a node has "
            f"{node_cpus:g}: raise train.workers or lower train.cpus_per_worker")
    tasks = max(1, int((aug - READ_CPUS) // AUG_TASK_CPUS))
    threads = max(1, math.floor(per_worker + 0.5))
    return Plan(workers, per_worker, threads, aug, tasks)

"""How a trial's CPUs are split between training workers and augmentation.

Ray Train reserves its workers' CPUs for the whole trial and Ray Data may only
schedule augmentation on what is left; if nothing is left the data stream
never starts and the trainers wait forever. So the split is decided here,
before anything is launched, and a job that cannot fit stops at once with the
numbers.

Default on a cluster of C CPUs: a quarter (at least half a CPU) goes to
augmentation, which costs about a fifth of a training step per image; the
rest is shared by the training workers. Each training worker runs as many
torch threads as whole CPUs it reserved (at least one), so cores are not
oversubscribed by more than the fractional remainder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from runner.config import JobConfig
from runner.data.pipeline import READ_CPUS
from runner.errors import RunnerError

AUG_SHARE = 0.25          # of the cluster's CPUs, when augment.cpus is not set
MIN_AUG_CPUS = 0.5
MIN_WORKER_CPUS = 0.25    # below this a worker is starved, not parallel
AUG_ACTOR_CPUS = 0.5      # each augmentation actor's reservation


@dataclass(frozen=True)
class Plan:
    workers: int
    cpus_per_worker: float
    threads_per_worker: int
    aug_cpus: float
    aug_actors: int

    @property
    def trial_cpus(self) -> float:
        return self.workers * self.cpus_per_worker + self.aug_cpus


def plan(job: JobConfig, cluster_cpus: float) -> Plan:
    """Size one trial for a cluster with ``cluster_cpus`` CPUs, or explain
    why it cannot run."""
    workers = job.train.workers
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
    actors = max(1, int((aug - READ_CPUS) // AUG_ACTOR_CPUS))
    return Plan(workers, per_worker, max(1, int(per_worker)), aug, actors)

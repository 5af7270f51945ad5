"""Connecting to Ray: a given address, the job's cluster, or a local one.

Under ``ray job submit`` the job supervisor sets RAY_ADDRESS and we join that
cluster. Otherwise ``ray.address`` in the job (or ``--address``) names one,
``auto`` finds a ``ray start --head`` on this machine, and with nothing set we
start a private local Ray with ``ray.num_cpus`` CPUs.
"""

from __future__ import annotations

import logging
import os

import ray

from runner.config import JobConfig

log = logging.getLogger(__name__)


def connect(job: JobConfig) -> float:
    """Make sure Ray is up; return the cluster's CPU count."""
    if not ray.is_initialized():
        address = job.ray.address or os.environ.get("RAY_ADDRESS")
        kwargs = {} if address else {"num_cpus": job.ray.num_cpus}
        # Keep Ray's per-task console echo: it carries the trainers' epoch lines.
        ray.init(address=address, logging_level=logging.WARNING, **kwargs)
    cpus = ray.cluster_resources().get("CPU", 0.0)
    log.info("Ray cluster: %g CPUs on %d node(s), dashboard %s", cpus,
             len([n for n in ray.nodes() if n["Alive"]]),
             ray.get_runtime_context().gcs_address)
    return cpus

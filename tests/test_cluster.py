"""What runner sets up for a Ray it starts itself."""

import os

from runner.cluster import IDLE_WORKERS_ENV, keep_idle_workers


def test_a_ray_we_start_keeps_more_idle_workers_than_it_has_cpus(monkeypatch):
    monkeypatch.delenv(IDLE_WORKERS_ENV, raising=False)
    keep_idle_workers(2)
    assert int(os.environ[IDLE_WORKERS_ENV]) > 2
    keep_idle_workers(32)  # the first setting stays for the process
    assert os.environ[IDLE_WORKERS_ENV] == "8"


def test_a_setting_of_the_users_own_is_kept(monkeypatch):
    monkeypatch.setenv(IDLE_WORKERS_ENV, "3")
    keep_idle_workers(2)
    assert os.environ[IDLE_WORKERS_ENV] == "3"

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


def test_a_local_ray_of_more_cpus_than_cores_is_warned_about(caplog):
    from runner.cluster import warn_oversubscribed
    cores = os.cpu_count()
    with caplog.at_level("WARNING", logger="runner.cluster"):
        warn_oversubscribed(None)
        warn_oversubscribed(cores)
        assert not caplog.records
        warn_oversubscribed(cores + 6)
    [record] = caplog.records
    assert record.getMessage().startswith(
        f"ray.num_cpus {cores + 6} is more than this machine's {cores} cores")


def test_an_address_without_a_port_is_refused_at_once():
    import pytest

    from runner.cluster import check_reachable
    from runner.errors import RunnerError
    for ok in (None, "", "auto", "local"):
        check_reachable(ok, "--address")
    with pytest.raises(RunnerError, match=r"Ray address 127.0.0.1 \(--address\): "
                                          "no port; give it as HOST:PORT"):
        check_reachable("127.0.0.1", "--address")

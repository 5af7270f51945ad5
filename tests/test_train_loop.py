"""Pieces of the training loop that need no cluster."""

import pytest

from runner.config import load_job
from runner.errors import RunnerError
from runner.train.loop import LR_FLOOR, lr_at, over_budget


def test_a_constant_schedule_keeps_the_rate():
    assert [lr_at(e, 5, 1e-3, "constant") for e in range(5)] == [1e-3] * 5


def test_a_cosine_schedule_anneals_from_the_rate_to_its_floor():
    rates = [lr_at(e, 5, 1e-3, "cosine") for e in range(5)]
    assert rates[0] == pytest.approx(1e-3)
    assert rates[-1] == pytest.approx(LR_FLOOR * 1e-3)
    assert all(a > b for a, b in zip(rates, rates[1:]))
    assert lr_at(0, 1, 1e-3, "cosine") == 1e-3  # one epoch: nothing to anneal


def test_an_unknown_schedule_is_refused_by_name():
    with pytest.raises(RunnerError, match="train.lr_schedule must be one of"):
        load_job("jobs/cats_dogs.yaml", ["train.lr_schedule=step"])


def test_a_budget_stops_once_any_capped_counter_reaches_its_cap():
    spent = {"flops": 2e12, "cpu_s": 100.0, "wall_s": 50.0}
    assert not over_budget(spent, {})
    assert not over_budget(spent, {"flops": 3e12})
    assert over_budget(spent, {"flops": 3e12, "wall_s": 50.0})

"""The text report, fed hand-made lineages (see test_report_html)."""

from runner.report import format_report
from test_report_html import stage, trial


def lineage(*stages):
    return {"run": "demo", "storage": "/runs/demo", "finished": True,
            "data": {"counts": {"train": {"cats": 4, "dogs": 4}}},
            "stages": list(stages)}


def test_a_first_stage_started_from_a_checkpoint_says_so():
    loaded = trial("load-lr0.001", "load", [.61, .64], 40)
    loaded["variant"] = {"op": "load", "checkpoint": "/runs/imported"}
    text = format_report(lineage(stage(1, "seed", [loaded], "load-lr0.001", None)))
    assert "stage 1 seed (from checkpoint /runs/imported)" in text
    assert "from scratch" not in text


def test_a_trial_stopped_early_is_told_from_a_finished_one():
    full = trial("a", "scratch", [.55, .61, .64], 40)
    cut = dict(trial("b", "scratch", [.50], 40), status="stopped early")
    text = format_report(lineage(stage(1, "seed", [full, cut], "a", None)))
    line_a = next(x for x in text.splitlines() if x.strip().startswith("* a "))
    line_b = next(x for x in text.splitlines() if x.strip().startswith("b "))
    assert "(best epoch 3 of 3)" in line_a and "stopped early" not in line_a
    assert "(best epoch 1 of 1, stopped early after 1)" in line_b

"""The live state and progress lines a run writes while it goes."""

import json
import logging
import pickle
from types import SimpleNamespace

from runner import storage
from runner.growth.progress import LIVE, Progress, format_duration
from runner.growth.variants import trial_name


def _progress(tmp_path, baseline=True):
    stages = [("seed", 2, 1), ("deepen", 3, 2)] + ([("baseline", 0, 1)] if baseline
                                                   else [])
    return Progress(storage.resolve(str(tmp_path)), "job", stages, ray_logs="/x")


def _epoch(n, acc=0.6, wall=10.0):
    return {"epoch": n, "val_acc": acc, "images_per_s": 250.0,
            "data_wait_frac": 0.1, "epoch_wall_s": wall, "flops": 1e12 * n}


CFG = {"variant": {"op": "scratch", "model": "classifier_1"}, "lr": 0.001}


def test_every_event_rewrites_live_json(tmp_path):
    p = _progress(tmp_path)
    p.stage_started("seed", 2, 1)
    p.trial_started("seed", "scratch-lr0.001", CFG)
    live = json.loads((tmp_path / LIVE).read_text())
    assert live["current"] == {"stage": "seed", "trial": "scratch-lr0.001"}
    assert live["trials"][0]["status"] == "RUNNING"
    assert [s["status"] for s in live["stages"]] == ["running", "pending", "pending"]
    p.trial_result("seed", "scratch-lr0.001", CFG, _epoch(1))
    live = json.loads((tmp_path / LIVE).read_text())
    assert live["trials"][0]["epochs"] == [{k: v for k, v in _epoch(1).items()
                                            if k != "epoch_wall_s"}]
    p.trial_ended("seed", "scratch-lr0.001", CFG, "TERMINATED")
    p.stage_done("seed")
    p.finished()
    live = json.loads((tmp_path / LIVE).read_text())
    assert live["state"] == "finished" and live["current"] is None
    assert live["trials"][0]["status"] == "TERMINATED"


def test_a_repeated_epoch_after_a_restart_replaces_the_old_one(tmp_path):
    p = _progress(tmp_path)
    p.stage_started("seed", 2, 1)
    p.trial_started("seed", "t", CFG)
    p.trial_result("seed", "t", CFG, _epoch(1, acc=0.5))
    p.trial_result("seed", "t", CFG, _epoch(1, acc=0.55))
    assert [e["val_acc"] for e in p.trial("seed", "t", CFG)["epochs"]] == [0.55]


def test_time_left_counts_every_epoch_still_to_run(tmp_path):
    p = _progress(tmp_path)
    assert p.eta() is None  # nothing timed yet
    p.stage_started("seed", 2, 1)
    p.trial_started("seed", "t", CFG)
    p.trial_result("seed", "t", CFG, _epoch(1, wall=10.0))
    # seed: 1 epoch left; deepen: 2 trials x 3; baseline ~ 2 + 3 epochs;
    # three trials still to start, at this trial's start-up time (~0 here).
    assert abs(p.eta() - (1 + 6 + 5) * 10.0) < 1.0


def test_the_progress_line_names_stage_trial_epoch_and_time_left(tmp_path, caplog):
    p = _progress(tmp_path, baseline=False)
    p.stage_started("deepen", 3, 2)
    p.trial_started("deepen", "a", CFG)
    with caplog.at_level(logging.INFO, logger="runner.progress"):
        p.trial_result("deepen", "a", CFG, _epoch(2, acc=0.7123))
    line = caplog.records[-1].getMessage()
    assert line.startswith("[2/2 deepen] trial 1/2 a epoch 2/3: val_acc 0.7123")
    assert "250 img/s" in line and "left" in line


def test_a_callback_restored_from_a_pickle_reports_to_the_running_driver(tmp_path):
    old = _progress(tmp_path)
    callback = pickle.loads(pickle.dumps(old.callback("seed")))
    new = _progress(tmp_path)
    new.callback("seed")  # the new driver's stage makes it the active one
    callback.on_trial_start(0, [], SimpleNamespace(config=CFG))
    assert new.trial("seed", trial_name(CFG), CFG)["status"] == "RUNNING"
    assert not [t for t in old.state["trials"] if t["status"] == "RUNNING"]


def test_durations_read_as_a_person_would_write_them():
    assert [format_duration(s) for s in (5, 65, 3725)] == ["5s", "1m05s", "1h02m"]


def test_stage_titles_count_the_baseline_as_the_progress_lines_do():
    from runner.config import load_job
    from runner.growth.loop import stage_title
    job = load_job("jobs/cats_dogs.yaml")
    assert [stage_title(job, i) for i in range(4)] == [
        "stage 1/4 (seed)", "stage 2/4 (deepen)", "stage 3/4 (widen)",
        "stage 4/4 (baseline)"]
    job.baseline = False
    assert stage_title(job, 2) == "stage 3/3 (widen)"


def test_a_restarted_trial_is_said_on_the_console(tmp_path, caplog):
    p = _progress(tmp_path, baseline=False)
    p.stage_started("seed", 2, 1)
    p.trial_started("seed", "t", CFG)
    with caplog.at_level(logging.INFO, logger="runner.progress"):
        p.trial_result("seed", "t", CFG, dict(_epoch(1), restarts=0))
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        p.trial_result("seed", "t", CFG, dict(_epoch(2), restarts=1))
        p.trial_result("seed", "t", CFG, dict(_epoch(1), restarts=2))
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warned == [
        "[1/2 seed] trial t restarted (restart 1): went on after epoch 1 from "
        "its checkpoint",
        "[1/2 seed] trial t restarted (restart 2): started over from its first "
        "weights (no readable checkpoint of its own; the worker log says why)"]

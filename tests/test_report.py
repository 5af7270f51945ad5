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


def test_epochs_missing_from_tunes_results_come_back_from_their_checkpoints(tmp_path):
    """After a stop and resume, Tune may hand back only the epochs since; the
    earlier ones are read from the metrics each checkpoint carries."""
    import torch

    from runner import storage
    from runner.growth.stage import with_missing_epochs
    from runner.model import build_model, get_spec
    from runner.model.checkpoint import save_checkpoint

    spec = get_spec("classifier_1")
    torch.manual_seed(0)
    state = build_model(spec).state_dict()
    trial_dir = tmp_path / "seed" / "train" / "t"
    for n, acc in ((1, 0.61), (2, 0.64)):
        save_checkpoint(trial_dir / f"epoch-{n:03d}", spec, state, {
            "epoch": n, "metrics": {"epoch": n, "val_acc": acc, "flops": n * 1e9}})
    resumed = [{"epoch": 3, "val_acc": 0.66, "flops": 3e9, "checkpoint_path": "x"}]
    epochs = with_missing_epochs(resumed, storage.resolve(str(trial_dir)),
                                 ["epoch", "val_acc", "flops"])
    assert [(e["epoch"], e["val_acc"]) for e in epochs] == [(1, .61), (2, .64), (3, .66)]
    assert epochs[0]["checkpoint_path"] == storage.resolve(
        str(trial_dir / "epoch-001")).uri


def test_a_moved_run_folder_reports_its_own_paths(tmp_path):
    import json

    from runner.report import report
    seed = stage(1, "seed", [trial("a", "scratch", [.6, .7], 40)], "a", None)
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "lineage.json").write_text(json.dumps(lineage(seed)))
    text = report(str(moved))
    assert "/runs/demo" not in text
    assert f"run demo at {moved}\n" in text
    assert f"checkpoint {moved}/a/epoch-002" in text

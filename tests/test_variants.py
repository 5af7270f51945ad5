"""Selection and variants are pure: fed made-up trial results here."""

from runner.config import StageConfig
from runner.growth.variants import (best_epoch, path_curve, select_winner,
                                    stage_variants, variant_label, verdict)


def trial(name, accs, flops_per_epoch=10.0):
    epochs = [{"epoch": i + 1, "val_acc": a, "flops": flops_per_epoch * (i + 1)}
              for i, a in enumerate(accs)]
    best = best_epoch(epochs)
    return {"name": name, "epochs": epochs,
            "best": {"val_acc": best["val_acc"], "flops": best["flops"],
                     "epoch": best["epoch"]}}


def test_best_epoch_prefers_the_earliest_of_equals():
    assert best_epoch([{"epoch": 1, "val_acc": .7}, {"epoch": 2, "val_acc": .8},
                       {"epoch": 3, "val_acc": .8}])["epoch"] == 2


def test_winner_by_validation_accuracy():
    assert select_winner([trial("a", [.6, .7]), trial("b", [.65, .75])])["name"] == "b"


def test_ties_go_to_less_compute():
    cheap = trial("z-cheap", [.8], flops_per_epoch=5.0)
    dear = trial("a-dear", [.8], flops_per_epoch=50.0)
    assert select_winner([dear, cheap])["name"] == "z-cheap"


def test_failed_trials_never_win():
    failed = {"name": "x", "epochs": [], "error": "boom"}
    assert select_winner([failed, trial("ok", [.5])])["name"] == "ok"


def test_selection_reads_no_test_accuracy():
    # A trial with a great test score but worse validation must lose.
    a, b = trial("a", [.7]), trial("b", [.8])
    a["test_acc"] = 0.99
    assert select_winner([a, b])["name"] == "b"


def test_first_stage_trains_its_model_from_scratch():
    stage = StageConfig(name="seed", model="classifier_1")
    assert stage_variants(stage, 0) == [{"op": "scratch", "model": "classifier_1"}]


def test_variant_labels_are_path_safe():
    label = variant_label({"op": "plain_copy", "to": "specs/big net.json"})
    assert "/" not in label and " " not in label


def stage(name, winner_accs, flops_per_epoch):
    t = trial(name + "-w", winner_accs, flops_per_epoch)
    t["compute"] = {"flops": flops_per_epoch * len(winner_accs)}
    return {"name": name, "winner": t["name"], "trials": [t]}


def test_path_curve_accumulates_compute_over_ancestors():
    stages = [stage("a", [.6, .7], 10.0), stage("b", [.72, .8], 5.0)]
    curve = path_curve(stages)
    assert [p["flops"] for p in curve] == [10.0, 20.0, 25.0, 30.0]
    assert [p["val_acc"] for p in curve] == [.6, .7, .72, .8]


def test_verdict_gives_the_fraction_of_baseline_compute():
    stages = [stage("a", [.6, .7], 10.0), stage("b", [.72, .8], 5.0)]
    baseline = {"val_acc": .72, "compute": {"flops": 50.0}}
    v = verdict(stages, baseline)
    assert v["growth_flops_to_match"] == 25.0
    assert v["fraction"] == 0.5
    assert "50%" in v["text"]


def test_verdict_says_when_growing_never_got_there():
    stages = [stage("a", [.6, .7], 10.0)]
    v = verdict(stages, {"val_acc": .9, "compute": {"flops": 50.0}})
    assert v["fraction"] is None and "never reached" in v["text"]


def test_a_first_stage_with_init_starts_from_that_checkpoint():
    stage = StageConfig(name="seed", init="runs/imported")
    assert stage_variants(stage, 0) == [{"op": "load", "checkpoint": "runs/imported"}]
    assert variant_label(stage_variants(stage, 0)[0]) == "load"


def test_a_stage_budget_sums_every_trial_running_totals():
    from runner.growth.variants import StageBudget

    budget = StageBudget({"flops": 100.0})
    assert not budget.spend("a", {"flops": 30.0})
    assert not budget.spend("a", {"flops": 60.0})  # cumulative: a has spent 60
    assert not budget.exhausted()
    assert budget.spend("b", {"flops": 40.0})      # 60 + 40 reaches the cap
    assert budget.exhausted()


def test_a_stage_budget_stops_on_whichever_unit_runs_out_first():
    from runner.growth.variants import StageBudget

    budget = StageBudget({"flops": 1e15, "wall_s": 10.0})
    assert budget.spend("a", {"flops": 1.0, "wall_s": 12.0})


def test_a_combined_variant_is_named_by_its_steps():
    label = variant_label({"op": "combine", "freeze_epochs": 1, "steps": [
        {"op": "deepen_block"}, {"op": "widen_dense", "index": 0, "units": 256}]})
    assert label == "deepen_block+widen_dense-index=0-units=256-freeze_epochs=1"

"""Selection and variants are pure: fed made-up trial results here."""

from runner.config import StageConfig
from runner.growth.variants import best_epoch, select_winner, stage_variants, variant_label


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

"""The growth job end to end on a real local Ray, real shards, real JPEGs."""

import json
from pathlib import Path

import pytest

from runner.config import load_job
from runner.growth.loop import grow
from runner.report import report


def tiny_job(root, data):
    """The shipped job, cut to one epoch per stage and fewer variants."""
    return load_job("jobs/cats_dogs.yaml", [
        f"storage={root}", f"data.root={data}", "train.batch_size=16",
        "stages.0.epochs=1", "stages.1.epochs=1", "stages.2.epochs=1",
        "stages.1.variants=[{op: plain_copy, to: classifier_2, freeze_epochs: 1},"
        " {op: deepen_block}]",
        "stages.2.variants=[{op: combine, steps: [{op: widen_dense, index: 0,"
        " units: 160}, {op: widen_conv, block: 0, layer: 0, filters: 40}]}]"])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, cats_dogs_subset, ray_local):
    root = tmp_path_factory.mktemp("run")
    lineage = grow(tiny_job(root, cats_dogs_subset))
    return root, lineage


def test_every_stage_is_recorded_with_a_winner_and_test_accuracy(tiny_run):
    root, lineage = tiny_run
    on_disk = json.loads((root / "lineage.json").read_text())
    assert on_disk == json.loads(json.dumps(lineage))
    assert lineage["finished"]
    seed, deepen, widen = lineage["stages"]
    assert [t["variant"]["op"] for t in seed["trials"]] == ["scratch"]
    assert sorted(t["variant"]["op"] for t in deepen["trials"]) == \
        ["deepen_block", "plain_copy"]
    for stage in lineage["stages"]:
        assert stage["winner"] in [t["name"] for t in stage["trials"]]
        assert stage["test"]["images"] == 40
        assert 0.0 <= stage["test"]["accuracy"] <= 1.0


def test_checkpoints_and_tune_results_live_under_the_run_root(tiny_run):
    root, lineage = tiny_run
    for stage in lineage["stages"]:
        ckpt = stage["checkpoint"]
        assert ckpt.startswith(str(root))
        assert {"model.pt", "spec.json", "meta.json"} <= {p.name for p in
                                                          (root / ckpt).iterdir()}
    # Each trial's checkpoints say the arithmetic it trained in (auto: this CPU's).
    from runner.train import precision
    meta = json.loads((root / lineage["stages"][0]["checkpoint"] / "meta.json").read_text())
    assert meta["precision"] == precision.resolve("auto")
    # Tune's own experiment folder, with TensorBoard event files.
    assert list((root / "deepen").rglob("events.out.tfevents*"))


def test_stage_two_starts_from_stage_one_and_reports_its_transfer(tiny_run):
    _, lineage = tiny_run
    seed, deepen, widen = lineage["stages"]
    assert deepen["parent"]["checkpoint"] == seed["checkpoint"]
    assert widen["parent"]["checkpoint"] == deepen["checkpoint"]
    copy = next(t for t in deepen["trials"] if t["variant"]["op"] == "plain_copy")
    copied = [x for x in copy["transfer"]["tensors"] if x["status"] == "copied"]
    assert sorted(x["name"] for x in copied) == ["blocks.0.convs.0.bias",
                                                "blocks.0.convs.0.weight"]


def test_frozen_transferred_layers_keep_their_weights_for_the_first_epoch(tiny_run):
    from runner.model.checkpoint import load_checkpoint

    root, lineage = tiny_run
    copy = next(t for t in lineage["stages"][1]["trials"]
                if t["variant"]["op"] == "plain_copy")
    _, init, _ = load_checkpoint(root / "deepen" / "init" / copy["name"])
    _, after, _ = load_checkpoint(copy["epochs"][0]["checkpoint_path"])
    assert after["blocks.0.convs.0.weight"].equal(init["blocks.0.convs.0.weight"])
    assert not after["head.0.weight"].equal(init["head.0.weight"])


def test_compute_is_counted_per_epoch_and_along_the_path(tiny_run):
    _, lineage = tiny_run
    seed, deepen, _ = lineage["stages"]
    for stage in lineage["stages"]:
        for t in stage["trials"]:
            assert t["compute"]["flops"] > 0 and t["compute"]["cpu_s"] > 0
            assert t["compute"]["flops"] == t["epochs"][-1]["flops"]
        assert stage["compute"]["flops"] == pytest.approx(
            sum(t["compute"]["flops"] for t in stage["trials"]))
    winner = next(t for t in deepen["trials"] if t["name"] == deepen["winner"])
    assert deepen["path_compute"]["flops"] == pytest.approx(
        seed["path_compute"]["flops"] + winner["compute"]["flops"])


def test_each_epochs_training_part_is_kept_apart_from_its_wall_time(tiny_run):
    """train_s (data wait + steps, per worker) leaves out the validation pass
    and the checkpoint that the epoch's wall time adds. (A first epoch's
    workers start at slightly different times, so only later epochs, where
    the workers set off together, are held to it.)"""
    _, lineage = tiny_run
    trials = [t for s in [*lineage["stages"], lineage["baseline"]] for t in s["trials"]]
    later = 0
    for t in trials:
        walls = [e["wall_s"] for e in t["epochs"]]
        for e, before, after in zip(t["epochs"][1:], walls, walls[1:]):
            assert 0 < e["train_s"] < after - before
            later += 1
        assert all(e["train_s"] > 0 for e in t["epochs"])
    assert later > 0


def test_baseline_trains_the_final_architecture_with_the_path_budget(tiny_run):
    _, lineage = tiny_run
    final, baseline = lineage["stages"][-1], lineage["baseline"]
    (trial,) = baseline["trials"]
    assert trial["variant"]["op"] == "scratch"
    final_spec = json.loads((Path(final["checkpoint"]) / "spec.json").read_text())
    assert json.loads(json.dumps(trial["variant"]["model"])) == final_spec
    assert baseline["budget_flops"] == pytest.approx(final["path_compute"]["flops"])
    # It stops at the first epoch end at or past its budget, not later.
    flops = [e["flops"] for e in trial["epochs"]]
    assert flops[-1] >= baseline["budget_flops"]
    assert all(f < baseline["budget_flops"] for f in flops[:-1])
    assert lineage["verdict"]["text"]


def test_report_prints_stages_trials_winner_and_test_accuracy(tiny_run):
    root, lineage = tiny_run
    text = report(str(root))
    assert lineage["verdict"]["text"] in text
    for stage in lineage["stages"]:
        assert f"stage {stage['index']} {stage['name']}" in text
        assert f"winner {stage['winner']}" in text
        assert f"test_acc {stage['test']['accuracy']:.4f}" in text


def test_rerunning_a_finished_run_trains_nothing(tiny_run, cats_dogs_subset, caplog):
    root, lineage = tiny_run
    with caplog.at_level("INFO"):
        again = grow(tiny_job(root, cats_dogs_subset))
    assert again["stages"] == json.loads(json.dumps(lineage["stages"]))
    assert "already done" in caplog.text

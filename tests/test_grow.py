"""The growth job end to end on a real local Ray, real shards, real JPEGs."""

import json

import pytest

from runner.config import load_job
from runner.growth.loop import grow
from runner.report import report


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, cats_dogs_subset, ray_local):
    root = tmp_path_factory.mktemp("run")
    job = load_job("jobs/cats_dogs.yaml", [
        f"storage={root}", f"data.root={cats_dogs_subset}",
        "stages.0.epochs=1", "stages.1.epochs=1", "train.batch_size=16"])
    lineage = grow(job)
    return root, lineage


def test_every_stage_is_recorded_with_a_winner_and_test_accuracy(tiny_run):
    root, lineage = tiny_run
    on_disk = json.loads((root / "lineage.json").read_text())
    assert on_disk == json.loads(json.dumps(lineage))
    assert lineage["finished"]
    seed, deepen = lineage["stages"]
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
    # Tune's own experiment folder, with TensorBoard event files.
    assert list((root / "deepen").rglob("events.out.tfevents*"))


def test_stage_two_starts_from_stage_one_and_reports_its_transfer(tiny_run):
    _, lineage = tiny_run
    seed, deepen = lineage["stages"]
    assert deepen["parent"]["checkpoint"] == seed["checkpoint"]
    copy = next(t for t in deepen["trials"] if t["variant"]["op"] == "plain_copy")
    copied = [x for x in copy["transfer"]["tensors"] if x["status"] == "copied"]
    assert sorted(x["name"] for x in copied) == ["blocks.0.convs.0.bias",
                                                "blocks.0.convs.0.weight"]


def test_compute_is_counted_per_epoch_and_along_the_path(tiny_run):
    _, lineage = tiny_run
    seed, deepen = lineage["stages"]
    for stage in lineage["stages"]:
        for t in stage["trials"]:
            assert t["compute"]["flops"] > 0 and t["compute"]["cpu_s"] > 0
    winner = next(t for t in deepen["trials"] if t["name"] == deepen["winner"])
    assert deepen["path_compute"]["flops"] == pytest.approx(
        seed["path_compute"]["flops"] + winner["compute"]["flops"])


def test_report_prints_stages_trials_winner_and_test_accuracy(tiny_run):
    root, lineage = tiny_run
    text = report(str(root))
    for stage in lineage["stages"]:
        assert f"stage {stage['index']} {stage['name']}" in text
        assert f"winner {stage['winner']}" in text
        assert f"test_acc {stage['test']['accuracy']:.4f}" in text


def test_rerunning_a_finished_run_trains_nothing(tiny_run, cats_dogs_subset, caplog):
    root, lineage = tiny_run
    job = load_job("jobs/cats_dogs.yaml", [
        f"storage={root}", f"data.root={cats_dogs_subset}",
        "stages.0.epochs=1", "stages.1.epochs=1"])
    with caplog.at_level("INFO"):
        again = grow(job)
    assert again["stages"] == json.loads(json.dumps(lineage["stages"]))
    assert "already done" in caplog.text

"""Every job-file setting is checked before a run starts: a bad one stops
`load_job` (or `prepare`, where the growth stages are built on paper) with one
line naming the job file, the setting and what it may be, before Ray starts
and before anything is written under the storage root."""

from pathlib import Path

import pytest
import yaml

from runner.config import load_job
from runner.errors import RunnerError

SHIPPED = Path("jobs/cats_dogs.yaml")


def job_file(tmp_path, change=None, text=None) -> str:
    """A copy of the shipped job, storage under ``tmp_path``, edited by
    ``change(raw)`` (or replaced by ``text``)."""
    path = tmp_path / "job.yaml"
    if text is None:
        raw = yaml.safe_load(SHIPPED.read_text())
        raw["storage"] = str(tmp_path / "run")
        if change:
            change(raw)
        text = yaml.safe_dump(raw, sort_keys=False)
    path.write_text(text)
    return str(path)


def refused(path, *words, overrides=()) -> str:
    """load_job's one-line refusal, naming the job file and ``words``."""
    with pytest.raises(RunnerError) as info:
        load_job(path, list(overrides))
    message = str(info.value)
    assert "\n" not in message, message
    assert message.startswith(f"job file {path}: "), message
    for word in words:
        assert word in message, message
    return message


def setting(dotted, value):
    """A change that sets ``dotted`` (e.g. ``stages.2.variants.1.filters``)."""
    *parents, leaf = dotted.split(".")

    def change(raw):
        node = raw
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else \
                node.setdefault(part, {})
        node[int(leaf) if isinstance(node, list) else leaf] = value
    return change


# --- settings of the wrong type or out of range --------------------------------


@pytest.mark.parametrize("dotted, value, words", [
    ("augment.rotation", "a lot", "augment.rotation must be a number"),
    ("augment.shear", "steep", "augment.shear must be a number"),
    ("augment.shear", -0.1, "augment.shear must be a number >= 0"),
    ("augment.shear", float("nan"), "augment.shear must be a number"),
    ("augment.zoom", [0.2], "augment.zoom must be a number"),
    ("data.val_fraction", "tenth", "data.val_fraction must be a number"),
    ("stages.1.variants", "plain_copy", "stages[1] (deepen).variants must be a list"),
    ("stages.1.variants", 3, "stages[1] (deepen).variants must be a list"),
    ("stages.1.variants", {"op": "deepen_block"}, "variants must be a list"),
    ("stages.1.budget", "lots", "stages[1] (deepen).budget must be a mapping"),
    ("stages.1.budget", 5, "budget must be a mapping"),
    ("stages.1.budget", [{"flops": 1e12}], "budget must be a mapping"),
    ("stages.1.stage_budget", 5, "stage_budget must be a mapping"),
    ("data.root", None, "data.root must be"),
    ("data.root", "", "data.root must be"),
    ("data.root", 5, "data.root must be"),
    ("data.shards", "", "data.shards must be"),
    ("data.shards", 5, "data.shards must be"),
    ("storage", None, "storage must be"),
    ("storage", "", "storage must be"),
    ("storage", 5, "storage must be"),
])
def test_a_setting_of_the_wrong_type_is_named(tmp_path, dotted, value, words):
    refused(job_file(tmp_path, setting(dotted, value)), words)


@pytest.mark.parametrize("dotted, value, words", [
    ("train.lr", float("nan"), "train.lr must be a positive number"),
    ("train.lr", float("inf"), "train.lr must be a positive number"),
    ("train.weight_decay", -1, "train.weight_decay must be a number >= 0"),
    ("train.weight_decay", float("nan"), "train.weight_decay must be a number"),
    ("stages.1.lr", float("nan"), "stages[1] (deepen).lr must be a positive number"),
    ("stages.1.lr", float("-inf"), "lr must be a positive number"),
    ("stages.1.lr", 0, "lr must be a positive number"),
    ("stages.1.lr", [], "stages[1] (deepen).lr must be a positive number or a"),
    ("stages.1.lr", [0.001, "fast"], "lr must be a positive number"),
    ("stages.1.lr", {"a": 1}, "lr must be a positive number"),
    ("stages.1.budget", {"flops": float("inf")}, "budget.flops must be a positive"),
    ("baseline", "yes", "baseline must be true or false, got 'yes'"),
    ("baseline", 2, "baseline must be true or false, got 2"),
    ("augment.flip", "yes", "augment.flip must be true or false"),
    ("augment.flip", 2, "augment.flip must be true or false"),
    ("name", "", "name must be"),
    ("name", "cats/dogs", "name must be"),
    ("name", None, "name must be"),
    ("stages.1.name", "../up", "stages[1].name must be"),
    ("ray.address", 6379, "ray.address must be"),
    ("stages.1.variants.1.freeze_epochs", 1.5,
     "stages[1] (deepen).variants[1].freeze_epochs must be a whole number"),
    ("stages.1.variants.1.freeze_epochs", -1, "variants[1].freeze_epochs"),
    ("stages.1.variants.1.freeze_epochs", "one", "variants[1].freeze_epochs"),
    ("stages.1.variants.1.freeze_epochs", 4, "at most the stage's 3 epochs"),
])
def test_a_nonsense_value_is_refused_by_name(tmp_path, dotted, value, words):
    refused(job_file(tmp_path, setting(dotted, value)), words)


def test_a_frozen_start_as_long_as_the_stage_loads(tmp_path):
    job = load_job(job_file(tmp_path, setting("stages.1.variants.1.freeze_epochs", 3)))
    assert job.stages[1].variants[1]["freeze_epochs"] == 3


def test_variants_on_the_first_stage_and_a_model_on_a_later_one_are_refused(tmp_path):
    refused(job_file(tmp_path, setting("stages.0.variants", [{"op": "deepen_block"}])),
            "stages[0] (seed).variants")
    refused(job_file(tmp_path, setting("stages.1.model", "classifier_2")),
            "stages[1] (deepen).model")


def test_an_error_in_the_file_names_it_even_with_other_overrides(tmp_path):
    path = job_file(tmp_path, setting("augment.flip", "yes"))
    refused(path, "augment.flip", overrides=["train.workers=1"])
    # an error the override itself brought is the override's, not the file's
    with pytest.raises(RunnerError) as info:
        load_job(job_file(tmp_path), ["augment.flip=2"])
    assert str(info.value) == "augment.flip must be true or false, got 2"


# --- the YAML itself --------------------------------------------------------------


def test_a_duplicate_key_is_named_with_its_line(tmp_path):
    text = SHIPPED.read_text().replace("seed: 0\n", "seed: 0\nseed: 1\n", 1)
    line = text.splitlines().index("seed: 1") + 1
    refused(job_file(tmp_path, text=text),
            f"line {line}, column 1: duplicate key 'seed' (first at line {line - 1})")


def test_a_duplicate_key_inside_a_variant_is_named(tmp_path):
    text = SHIPPED.read_text().replace(
        "{op: deepen_block}", "{op: deepen_block, op: plain_copy}", 1)
    line = next(i for i, s in enumerate(text.splitlines(), 1) if "op: deepen_block," in s)
    refused(job_file(tmp_path, text=text), f"line {line}, column 28: duplicate key 'op'")


def test_a_yaml_syntax_error_is_one_line_with_line_and_column(tmp_path):
    refused(job_file(tmp_path, text="name: t\nstages: [unclosed\n"),
            "not valid YAML at line 3, column 1: expected ',' or ']'",
            "flow sequence at line 2, column 9")


@pytest.mark.parametrize("text", ["", "# only a comment\n", "---\n"])
def test_an_empty_job_file_is_named(tmp_path, text):
    refused(job_file(tmp_path, text=text), "empty")


def test_the_shipped_jobs_still_load():
    for name in ("jobs/cats_dogs.yaml", "jobs/cats_dogs_long.yaml"):
        assert len(load_job(name).stages) == 3


# --- growth variants, built on paper before anything runs ----------------------


def test_the_shipped_jobs_grow_on_paper():
    from runner.growth.variants import stage_children

    job = load_job("jobs/cats_dogs.yaml")
    children = stage_children(job.stages, job.stages[0].model, job.seed)
    assert [c.name for c in children[0]] == ["classifier_1"]
    # plain_copy and deepen_block both make classifier_2's architecture
    assert [c.name for c in children[1]] == ["classifier_2"]
    assert len(children[2]) == 4  # four ways to grow it
    long = load_job("jobs/cats_dogs_long.yaml")
    assert stage_children(long.stages, "classifier_1", long.seed) == children


def refused_before_run(tmp_path, path, *words, overrides=(), blamed=True) -> str:
    """prepare's refusal: named like load_job's, nothing under the storage
    root, no Ray."""
    import ray

    from runner.growth.loop import prepare

    job = load_job(path, list(overrides))
    with pytest.raises(RunnerError) as info:
        prepare(job)
    message = str(info.value)
    assert "\n" not in message, message
    assert message.startswith(f"job file {path}: ") == blamed, message
    for word in words:
        assert word in message, message
    assert not (tmp_path / "run").exists()
    assert not ray.is_initialized()
    return message


@pytest.mark.parametrize("dotted, value, words", [
    ("stages.2.variants.1", {"op": "widen_dense", "index": 0, "factor": 2},
     ["stages[2] (widen).variants[1]", "unknown parameter(s) factor",
      "parameters: index, units, noise"]),
    ("stages.2.variants.0.block", 5,
     ["stages[2] (widen).variants[0]", "block must be an index in 0..1, got 5"]),
    ("stages.2.variants.0.filters", 64.5,
     ["stages[2] (widen).variants[0]", "widen_conv filters must be a whole number, got 64.5"]),
    ("stages.2.variants.1.units", -5, ["variants[1]", "units must be more, got -5"]),
    ("stages.2.variants.2.after_layer", 0.5, ["variants[2]", "after_layer"]),
    ("stages.1.variants.2", {"op": "deepen_block", "filters": 16},
     ["stages[1] (deepen).variants[2]", "filters must be >="]),
    ("stages.1.variants.0.to", "classifier_9",
     ["stages[1] (deepen).variants[0]", "unknown model spec 'classifier_9'"]),
    ("stages.0.model", "classifier_9",
     ["stages[0] (seed).model", "unknown model spec 'classifier_9'"]),
    ("stages.1.variants.2", {"op": "deepen_block", "lr": []},
     ["variants[2]", "unknown parameter(s) lr"]),
    ("stages.2.variants.3.steps.1.units", 12.5,
     ["stages[2] (widen).variants[3]", "widen_dense units must be a whole number, got 12.5"]),
])
def test_a_variant_that_does_not_build_is_refused_before_the_run(
        tmp_path, dotted, value, words):
    refused_before_run(tmp_path, job_file(tmp_path, setting(dotted, value)), *words)


def test_a_variant_must_build_from_every_parent_the_stage_before_may_choose(tmp_path):
    def change(raw):
        raw["stages"][1]["variants"] = [
            {"op": "plain_copy", "to": "classifier_2"},
            {"op": "widen_conv", "block": 0, "layer": 0, "filters": 64}]
        raw["stages"][2]["variants"] = [
            {"op": "widen_conv", "block": 0, "layer": 0, "filters": 48}]
    # 48 filters widen classifier_2's 32, not the 64 of the widened classifier_1
    refused_before_run(tmp_path, job_file(tmp_path, change),
                       "stages[2] (widen).variants[0]", "classifier_1+widen_conv",
                       "has 64 filters")


def test_the_file_is_named_only_when_it_holds_the_bad_variant(tmp_path):
    bad = "stages.2.variants=[{op: widen_conv, block: 7, layer: 0, filters: 64}]"
    message = refused_before_run(tmp_path, job_file(tmp_path), overrides=[bad],
                                 blamed=False)
    assert message.startswith("stages[2] (widen).variants[0] (widen_conv) does "
                              "not build from classifier_2: widen_conv block must "
                              "be an index in 0..1, got 7"), message
    path = job_file(tmp_path, setting("stages.2.variants.0.block", 7))
    refused_before_run(tmp_path, path, "block must be an index in 0..1, got 7",
                       overrides=[f"storage={tmp_path / 'run'}"])


def test_a_job_from_a_checkpoint_grows_that_checkpoints_spec_on_paper(tmp_path):
    import torch

    from runner.model import build_model, get_spec
    from runner.model.checkpoint import save_checkpoint

    spec = get_spec("classifier_1")
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "ckpt", spec, build_model(spec).state_dict(),
                    {"epoch": 0})

    def change(raw):
        raw["stages"][0] = {"name": "seed", "init": str(tmp_path / "ckpt"), "epochs": 1}
        # classifier_1 has one block: block 1 is not there to widen
        raw["stages"][1]["variants"] = [
            {"op": "widen_conv", "block": 1, "layer": 0, "filters": 64}]
    refused_before_run(tmp_path, job_file(tmp_path, change),
                       "stages[1] (deepen).variants[0]", "block must be an index in 0..0")


def test_the_command_line_says_it_in_one_line_before_ray_starts(tmp_path, capsys):
    import ray

    from runner.cli import main

    path = job_file(tmp_path, setting("stages.2.variants.0.block", 7))
    assert main(["grow", path]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"runner: error: job file {path}: stages[2] (widen)")
    assert not (tmp_path / "run").exists()
    assert not ray.is_initialized()


def test_an_image_size_the_first_model_does_not_take_is_refused_before_the_run(
        tmp_path):
    refused_before_run(tmp_path, job_file(tmp_path, setting("data.image_size", 32)),
                       "data.image_size 32 does not fit stages[0] (seed)",
                       "classifier_1 takes 64x64 images")


def test_a_seed_torch_cannot_take_is_refused(tmp_path):
    refused(job_file(tmp_path, setting("seed", 2**63)), "seed must be at most")
    load_job(job_file(tmp_path, setting("seed", 2**63 - 1)))


@pytest.mark.parametrize("overrides, words", [
    (["train.cpus_per_worker=2"], ["a trial needs 2.5 CPUs", "has 2"]),
    (["augment.cpus=2"], ["a trial needs", "but the Ray cluster has 2"]),
    (["train.workers=2", "train.cpus_per_worker=1"], ["a trial needs 2.5 CPUs"]),
])
def test_a_cpu_plan_the_local_ray_cannot_hold_is_refused_before_ingest(
        tmp_path, monkeypatch, overrides, words):
    """With no cluster to join, the local Ray a run would start has
    ray.num_cpus CPUs: a plan that does not fit is known before the data is
    ingested or Ray started."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    refused_before_run(tmp_path, job_file(tmp_path), *words,
                       overrides=["ray.num_cpus=2", *overrides], blamed=False)

"""The evaluate, predict and transfer commands, run in-process on a real (untrained)
checkpoint and real JPEGs; no Ray and no training."""

import json
import os

import pytest
import torch

from runner.cli import EXAMPLES, main
from runner.model import (
    build_model,
    classifier_1,
    classifier_2,
    load_checkpoint,
    save_checkpoint,
)
from runner.model.checkpoint import _sha256


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """classifier_1 with seeded random weights; meta names the classes."""
    torch.manual_seed(0)
    state = build_model(classifier_1()).state_dict()
    folder = tmp_path_factory.mktemp("ckpt") / "epoch-000"
    save_checkpoint(folder, classifier_1(), state, {"epoch": 0,
                                                    "classes": ["cats", "dogs"]})
    return folder


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    # one shards cache for the module, so only the first evaluation ingests
    return tmp_path_factory.mktemp("cache") / "shards"


def jpegs(subset, split="test_set"):
    return [sorted((subset / split / c).glob("*.jpg"))[0] for c in ("cats", "dogs")]


def run_cli(capsys, *argv):
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_every_command_has_help_with_an_example(capsys):
    for command in EXAMPLES:
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0
        assert f"example: {EXAMPLES[command]}" in " ".join(
            capsys.readouterr().out.split())


def test_evaluate_a_checkpoint_prints_accuracy_per_class_and_confusion(
        ckpt, cats_dogs_subset, cache, capsys):
    status, out, _ = run_cli(capsys, "evaluate", ckpt, "--data", cats_dogs_subset,
                             "--cache", cache)
    assert status == 0, out
    assert "classifier_1 on test (40 images)" in out
    assert "accuracy " in out and "confusion" in out
    rows = [line.split() for line in out.splitlines()]
    confusion = [r[1:] for r in rows if len(r) == 3 and r[0] in ("cats", "dogs")
                 and r[1].isdigit() and r[2].isdigit()]
    assert len(confusion) == 2 and sum(int(n) for r in confusion for n in r) == 40

    sizes = {}
    for split in ("train", "val"):
        status, out, _ = run_cli(capsys, "evaluate", ckpt, "--data",
                                 cats_dogs_subset, "--cache", cache, "--json",
                                 "--split", split)
        result = json.loads(out)
        assert status == 0 and result["split"] == split
        assert 0.0 <= result["accuracy"] <= 1.0
        assert set(result["per_class"]) == {"cats", "dogs"}
        sizes[split] = result["images"]
    # "train" leaves out the validation rows, as a run's training does
    assert sizes["train"] + sizes["val"] == 80 and sizes["val"] > 0


def test_evaluate_a_run_scores_its_last_winner_with_a_cache_in_the_run(
        ckpt, cats_dogs_subset, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    stage = {"name": "seed", "checkpoint": str(ckpt)}
    (run / "lineage.json").write_text(json.dumps(
        {"stages": [stage], "data": {"classes": ["cats", "dogs"], "base_size": 72}}))
    status, out, _ = run_cli(capsys, "evaluate", run, "--data", cats_dogs_subset,
                             "--json")
    assert status == 0
    assert json.loads(out)["checkpoint"] == str(ckpt)
    assert (run / "eval-data" / "manifest.json").is_file()


def test_predict_prints_one_line_per_image_and_fails_on_a_bad_one(
        ckpt, cats_dogs_subset, tmp_path, capsys):
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a picture")
    images = [*jpegs(cats_dogs_subset), bad]
    status, out, err = run_cli(capsys, "predict", ckpt, *images)
    assert status == 1
    lines = out.splitlines()
    assert len(lines) == 2
    for image, line in zip(images, lines):
        path, name, prob = line.split("\t")
        assert path == str(image) and name in ("cats", "dogs")
        assert 0.5 <= float(prob) <= 1.0  # the probability of the class named
    assert err.count("\n") == 1 and "notes.jpg" in err and "not_an_image" in err


def test_predict_without_class_names_says_class_0_or_1(cats_dogs_subset, tmp_path,
                                                       capsys):
    folder = save_checkpoint(tmp_path / "anon", classifier_1(),
                             build_model(classifier_1()).state_dict(), {})
    status, out, _ = run_cli(capsys, "predict", folder, *jpegs(cats_dogs_subset))
    assert status == 0
    assert {line.split("\t")[1] for line in out.splitlines()} <= {"class 0",
                                                                  "class 1"}


def test_transfer_plain_copy_writes_a_checkpoint_that_loads(ckpt, tmp_path, capsys):
    out_dir = tmp_path / "copied"
    status, out, _ = run_cli(capsys, "transfer", "--from", ckpt, "--op", "plain_copy",
                             "--to", "classifier_2", "--out", out_dir)
    assert status == 0
    assert "plain_copy: classifier_1 -> classifier_2" in out and "copied 896" in out
    spec, _, meta = load_checkpoint(out_dir)
    assert spec.name == "classifier_2"
    assert meta["transfer"]["counts"]["copied"] == 896
    assert meta["classes"] == ["cats", "dogs"] and meta["parent"] == str(ckpt)


def test_transfer_with_data_measures_drift(ckpt, cats_dogs_subset, cache, tmp_path,
                                           capsys):
    status, out, _ = run_cli(capsys, "transfer", "--from", ckpt, "--op",
                             "widen_dense", "--param", "index=0", "--param",
                             "units=160", "--seed", "1", "--out", tmp_path / "wide",
                             "--data", cats_dogs_subset, "--cache", cache)
    assert status == 0
    assert "drift: max |logit diff|" in out
    meta = json.loads((tmp_path / "wide" / "meta.json").read_text())
    assert meta["transfer"]["max_abs_logit_diff"] < 1e-4  # Net2Wider is exact


@pytest.mark.parametrize("argv", [
    ["evaluate", "{missing}", "--data", "{data}"],
    ["predict", "{missing}", "x.jpg"],
    ["transfer", "--from", "{missing}", "--op", "plain_copy", "--out", "{out}"],
])
def test_a_bad_checkpoint_path_is_one_line(argv, cats_dogs_subset, tmp_path, capsys):
    values = {"missing": tmp_path / "nope", "data": cats_dogs_subset,
              "out": tmp_path / "out"}
    status, _, err = run_cli(capsys, *(a.format(**values) for a in argv))
    assert status == 2
    assert err.count("\n") == 1 and err.startswith("runner: error: ")
    assert "nope" in err


def test_unknown_op_lists_the_ops(ckpt, tmp_path, capsys):
    status, _, err = run_cli(capsys, "transfer", "--from", ckpt, "--op", "shrink",
                             "--out", tmp_path / "x")
    assert status == 2 and err.count("\n") == 1
    for op in ("widen_conv", "deepen_block", "plain_copy", "function_preserving"):
        assert op in err


def test_another_architecture_is_one_line(ckpt, tmp_path, capsys):
    folder = tmp_path / "other"
    folder.mkdir()
    for name in ("model.pt", "meta.json"):
        (folder / name).write_bytes((ckpt / name).read_bytes())
    # classifier_1's weights under classifier_2's spec
    (folder / "spec.json").write_text(json.dumps(
        {"name": "classifier_2", "blocks": [{"convs": [{"filters": 32}]}] * 2}))
    status, _, err = run_cli(capsys, "predict", folder, "x.jpg")
    assert status == 2 and err.count("\n") == 1
    assert "weights do not fit spec 'classifier_2'" in err


class Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def test_an_unsafe_pickle_is_refused_in_one_line(ckpt, cats_dogs_subset, tmp_path,
                                                 capsys):
    folder, marker = tmp_path / "evil", tmp_path / "pwned"
    folder.mkdir()
    (folder / "spec.json").write_bytes((ckpt / "spec.json").read_bytes())
    torch.save({"out.weight": Payload(marker)}, folder / "model.pt")
    # the attacker fixes the checksum too
    (folder / "meta.json").write_text(json.dumps(
        {"sha256": _sha256(folder / "model.pt")}))
    for argv in (["predict", folder, *jpegs(cats_dogs_subset)],
                 ["transfer", "--from", folder, "--op", "plain_copy", "--to",
                  "classifier_2", "--out", tmp_path / "x"]):
        status, out, err = run_cli(capsys, *argv)
        assert status == 2 and out == "" and err.count("\n") == 1
        assert f"refused to load {folder / 'model.pt'}: the file holds pickled " \
               "Python objects (it asks for exec), not plain tensors" in err
        assert "refused for safety" in err
        assert "weights_only" not in err  # torch's advice to load it unsafely
    assert not marker.exists()


def test_a_run_without_a_finished_stage_is_one_line(cats_dogs_subset, tmp_path,
                                                    capsys):
    (tmp_path / "lineage.json").write_text(json.dumps({"stages": []}))
    status, _, err = run_cli(capsys, "evaluate", tmp_path, "--data", cats_dogs_subset)
    assert status == 2 and err.count("\n") == 1 and "no stage has finished" in err


def test_the_cli_keeps_ray_on_loopback_before_ray_reads_its_settings():
    """Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, when it is imported;
    the CLI must set it before any command imports Ray."""
    import subprocess
    import sys

    code = ("import os, sys\n"
            "os.environ.pop('RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER', None)\n"
            "from runner.cli import main\n"
            "main(['grow', 'no-such-job.yaml'])\n"
            "from ray._private import ray_constants\n"
            "sys.exit(0 if ray_constants.ENABLE_RAY_CLUSTER is False else 1)\n")
    env = {k: v for k, v in os.environ.items()
           if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    assert subprocess.run([sys.executable, "-c", code], env=env,
                          capture_output=True).returncode == 0


# --- user-fixable mistakes: one line, exit 2, nothing already written damaged ---


def one_line_error(capsys, *argv) -> str:
    status, out, err = run_cli(capsys, *argv)
    assert status == 2 and out == "", err
    assert err.startswith("runner: error: ") and err.count("\n") == 1, err
    return err


def test_report_of_a_file_says_it_is_not_a_run_folder(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a run")
    err = one_line_error(capsys, "report", notes)
    assert err.startswith(f"runner: error: {notes}: is a file, not a run folder")
    assert notes.read_text() == "not a run"


def test_transfer_onto_a_file_is_refused_and_the_file_kept(ckpt, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    for out in (notes, notes / "grown"):  # the file itself, or in the way
        err = one_line_error(capsys, "transfer", "--from", ckpt, "--op",
                             "plain_copy", "--to", "classifier_2", "--out", out)
        assert f"--out {out}: " in err and "is a file, not a folder" in err
    assert notes.read_text() == "keep me"


def swapped_spec(ckpt, folder):
    """``ckpt``'s weights and meta under classifier_2's spec, as if spec.json
    had been copied over from another model's checkpoint."""
    folder.mkdir()
    for name in ("model.pt", "meta.json"):
        (folder / name).write_bytes((ckpt / name).read_bytes())
    (folder / "spec.json").write_text(json.dumps(classifier_2().to_dict()))
    return folder


def test_weights_that_do_not_fit_the_spec_name_the_checkpoint_everywhere(
        ckpt, cats_dogs_subset, cache, tmp_path, capsys):
    folder = swapped_spec(ckpt, tmp_path / "swapped")
    run = tmp_path / "run"
    run.mkdir()
    (run / "lineage.json").write_text(json.dumps(
        {"stages": [{"name": "seed", "checkpoint": str(folder)}],
         "data": {"classes": ["cats", "dogs"], "base_size": 72}}))
    exported = tmp_path / "model.ts"
    for target in (folder, run):  # the folder itself, or a run's winner
        for argv in (["predict", target, *jpegs(cats_dogs_subset)],
                     ["evaluate", target, "--data", cats_dogs_subset, "--cache",
                      cache],
                     ["export", target, "--format", "torchscript", "--out",
                      exported]):
            err = one_line_error(capsys, *argv)
            assert (f"checkpoint {folder}: weights do not fit spec "
                    "'classifier_2'") in err
    assert not exported.exists()


@pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants")
def test_tensors_torch_cannot_load_into_the_model_are_one_line(
        ckpt, cats_dogs_subset, tmp_path, capsys):
    # right names and shapes, but sparse: torch refuses to copy them
    folder = tmp_path / "sparse"
    folder.mkdir()
    (folder / "spec.json").write_bytes((ckpt / "spec.json").read_bytes())
    _, state, _ = load_checkpoint(ckpt)
    torch.save({k: v.to_sparse() for k, v in state.items()}, folder / "model.pt")
    (folder / "meta.json").write_text(json.dumps(
        {"sha256": _sha256(folder / "model.pt")}))
    for argv in (["predict", folder, *jpegs(cats_dogs_subset)],
                 ["export", folder, "--format", "torchscript", "--out",
                  tmp_path / "model.ts"]):
        err = one_line_error(capsys, *argv)
        assert (f"checkpoint {folder}: weights do not fit spec 'classifier_1': "
                "blocks.0.convs.0.weight: ") in err


def tree(folder):
    """Every file under ``folder`` with its size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_evaluating_another_folder_never_writes_into_the_runs_shards(
        ckpt, cats_dogs_subset, tmp_path, capsys):
    from runner.data.ingest import ingest
    run, other = tmp_path / "run", tmp_path / "other"
    ingest(str(cats_dogs_subset), str(run / "data"), workers=1)
    (run / "lineage.json").write_text(json.dumps(
        {"stages": [{"name": "seed", "checkpoint": str(ckpt)}],
         "data": {"classes": ["cats", "dogs"], "base_size": 72,
                  "location": str(run / "data")}}))
    for split in ("training_set", "test_set"):  # a smaller, other folder
        for cls in ("cats", "dogs"):
            (other / split / cls).mkdir(parents=True)
            for jpeg in sorted((cats_dogs_subset / split / cls).glob("*.jpg"))[:4]:
                (other / split / cls / jpeg.name).write_bytes(jpeg.read_bytes())
    shards = tree(run / "data")

    status, out, _ = run_cli(capsys, "evaluate", run, "--data", other, "--json")
    assert status == 0 and json.loads(out)["images"] == 8
    assert tree(run / "data") == shards  # its own cache: RUN/eval-data
    assert (run / "eval-data" / "manifest.json").is_file()

    err = one_line_error(capsys, "evaluate", run, "--data", other, "--cache",
                         run / "data")
    assert f"--cache {run / 'data'} is the run's own data folder" in err
    assert tree(run / "data") == shards

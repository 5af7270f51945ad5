"""Refusals that come before any work: a changed job on a run's storage root,
a Ray address nothing listens at, a report page that cannot be written, bad
--param values; and predict on a folder with unreadable images. Real run
folders (ingested, not trained), real JPEGs, real checkpoints; no Ray starts."""

import json
import os
import socket
import sys

import pytest
import ray
import torch
import yaml

from runner.cli import main
from runner.config import load_job
from runner.errors import RunnerError
from runner.growth.loop import check_resume, grow, job_changes, prepare
from runner.model import build_model, classifier_1, load_checkpoint, save_checkpoint
from runner.model.checkpoint import _sha256

JOB = "jobs/cats_dogs.yaml"


def run_cli(capsys, *argv):
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def one_line_error(capsys, *argv) -> str:
    status, out, err = run_cli(capsys, *argv)
    assert status == 2 and out == "", err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("runner: error: "), err
    return lines[-1]


def settings(root, data) -> list[str]:
    return [f"storage={root}", f"data.root={data}"]


def snapshot(folder) -> dict:
    """Every file and folder under ``folder``: bytes for files."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def stored_run(tmp_path_factory, cats_dogs_subset):
    """A run folder as `runner grow` leaves it before its first trial: the
    shards in data/ and the resolved job in job.yaml (no training)."""
    root = tmp_path_factory.mktemp("run")
    job = load_job(JOB, settings(root, cats_dogs_subset))
    prepare(job)
    (root / "job.yaml").write_text(yaml.safe_dump(job.to_dict(), sort_keys=False))
    return root


# --- a changed job on an existing run ---------------------------------------------


def test_a_changed_job_is_refused_before_ingest_or_any_write(stored_run,
                                                             cats_dogs_subset, capsys):
    before = snapshot(stored_run)
    assert "data/manifest.json" in before and "job.yaml" in before
    # data.base_size would ingest the data again over data/ if it got that far
    line = one_line_error(capsys, "grow", JOB,
                          *[f"--set={s}" for s in settings(stored_run, cats_dogs_subset)],
                          "--set=stages.0.epochs=5", "--set=data.base_size=80")
    assert line.startswith(f"runner: error: {stored_run} holds a run started with "
                           "other settings (")
    assert "data.base_size: 72 -> 80" in line and "stages.0.epochs: 4 -> 5" in line
    assert "--set storage=" in line
    assert snapshot(stored_run) == before
    assert not ray.is_initialized()


def test_grow_itself_refuses_a_changed_job_before_writing_job_yaml(
        stored_run, cats_dogs_subset):
    before = snapshot(stored_run)
    job = load_job(JOB, settings(stored_run, cats_dogs_subset) + [
        "train.lr_schedule=cosine"])
    with pytest.raises(RunnerError, match="train.lr_schedule: constant -> cosine"):
        grow(job)
    assert snapshot(stored_run) == before
    assert not ray.is_initialized()


def test_the_same_job_resumes_and_only_storage_and_address_may_differ(
        stored_run, cats_dogs_subset):
    same = load_job(JOB, settings(stored_run, cats_dogs_subset))
    check_resume(same)
    # the same root spelled another way, and another cluster to run it on
    moved = load_job(JOB, [f"storage={os.path.relpath(stored_run)}",
                           f"data.root={cats_dogs_subset}",
                           "ray.address=127.0.0.1:6379"])
    check_resume(moved)
    busy = load_job(JOB, settings(stored_run, cats_dogs_subset) + ["ray.num_cpus=1"])
    with pytest.raises(RunnerError, match=r"ray.num_cpus: null -> 1\)"):
        check_resume(busy)


def test_changes_are_named_by_dotted_path_and_added_items_whole():
    before = load_job(JOB).to_dict()
    changed = load_job(JOB, ["seed=3", "stages.1.variants.2.pool=avg"]).to_dict()
    assert job_changes(before, changed) == [
        "seed: 0 -> 3", "stages.1.variants.2.pool: (not set) -> avg"]
    longer = dict(before, stages=[*before["stages"], {"name": "more"}])
    assert job_changes(before, longer) == ['stages.3: (not set) -> {"name": "more"}']
    elsewhere = dict(before, storage="s3://bucket/run",
                     ray=dict(before["ray"], address="auto"))
    assert job_changes(before, elsewhere) == []


def test_a_run_written_before_a_setting_existed_resumes_at_its_default(
        tmp_path, cats_dogs_subset):
    """A job.yaml from an older runner lacks the settings added since; it is
    read as this runner reads a job file, defaults filled in, so upgrading
    in the middle of a run does not lose the run."""
    import yaml
    job = load_job(JOB, settings(tmp_path, cats_dogs_subset))
    older = job.to_dict()
    del older["train"]["precision"]
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(older, sort_keys=False))
    check_resume(job)
    other = load_job(JOB, settings(tmp_path, cats_dogs_subset) + ["train.precision=fp32"])
    with pytest.raises(RunnerError, match=r"\(train.precision: auto -> fp32\)"):
        check_resume(other)


def test_a_job_yaml_that_is_not_a_job_is_named(tmp_path, cats_dogs_subset):
    (tmp_path / "job.yaml").write_text("[1, 2]\n")
    with pytest.raises(RunnerError, match=f"{tmp_path}/job.yaml is not a job"):
        check_resume(load_job(JOB, settings(tmp_path, cats_dogs_subset)))


# --- a Ray address nothing listens at ----------------------------------------------


def free_port() -> int:
    """A loopback port nothing listens at (bound once, then let go)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_grow_with_a_dead_address_fails_at_once_naming_it(tmp_path, cats_dogs_subset,
                                                          capsys):
    address = f"127.0.0.1:{free_port()}"
    run = tmp_path / "run"
    line = one_line_error(capsys, "grow", JOB,
                          *[f"--set={s}" for s in settings(run, cats_dogs_subset)],
                          "--address", address)
    assert line.startswith(f"runner: error: cannot reach Ray at {address} "
                           "(--address): ")
    line = one_line_error(capsys, "grow", JOB,
                          *[f"--set={s}" for s in settings(run, cats_dogs_subset)],
                          f"--set=ray.address={address}")
    assert f"cannot reach Ray at {address} (ray.address in {JOB})" in line
    assert not run.exists()
    assert not ray.is_initialized()


def test_doctor_shares_the_probe_and_names_an_address_whose_port_is_no_number(
        capsys):
    address = f"127.0.0.1:{free_port()}"
    bad_port = "Ray address 127.0.0.1:abc (--address): 'abc' is not a port number"
    for given, words in ((address, f"cannot reach Ray at {address} (--address): "),
                         ("127.0.0.1:abc", bad_port)):
        status, out, _ = run_cli(capsys, "doctor", "--address", given)
        fails = [line for line in out.splitlines() if line.startswith("FAIL")]
        assert status == 1 and len(fails) == 1, out
        assert fails[0].startswith(f"FAIL {words}"), fails
    assert not ray.is_initialized()


# --- report --html to a path that cannot take the page --------------------------


@pytest.fixture
def lineage_run(tmp_path):
    """A run folder with the lineage of a run whose first stage is running."""
    run = tmp_path / "run"
    run.mkdir()
    counts = {"cats": 40, "dogs": 40}
    (run / "lineage.json").write_text(json.dumps({
        "run": "cats_dogs", "storage": str(run), "job": {}, "stages": [],
        "data": {"counts": {"train": counts, "test": counts}, "skipped": 0,
                 "classes": ["cats", "dogs"], "base_size": 72,
                 "location": str(run / "data")},
        "finished": False}))
    return run


def test_report_html_to_a_folder_or_under_a_file_is_one_line(lineage_run, tmp_path,
                                                             capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    (tmp_path / "pages").mkdir()
    for path, words in ((tmp_path / "pages", "is a folder"),
                        (lineage_run, "is a folder"),
                        (notes / "report.html", f"{notes} is a file, not a folder")):
        line = one_line_error(capsys, "report", lineage_run, "--html", path)
        assert line.startswith(f"runner: error: --html {path}: {words}"), line
    assert notes.read_text() == "keep me"
    assert sorted(p.name for p in lineage_run.iterdir()) == ["lineage.json"]
    status, _, _ = run_cli(capsys, "report", lineage_run, "--html",
                           tmp_path / "pages" / "run.html")
    assert status == 0 and (tmp_path / "pages" / "run.html").is_file()


# --- small ones ------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("ckpt") / "epoch-000"
    save_checkpoint(folder, classifier_1(), build_model(classifier_1()).state_dict(),
                    {"epoch": 0, "classes": ["cats", "dogs"]})
    return folder


def test_onnx_export_without_its_packages_says_how_to_install_them(
        ckpt, tmp_path, capsys, monkeypatch):
    # a None entry in sys.modules is how Python marks a module as absent
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    out = tmp_path / "model.onnx"
    line = one_line_error(capsys, "export", ckpt, "--format", "onnx", "--out", out)
    assert "needs onnxruntime" in line and "pip install -e '.[onnx]'" in line
    assert not out.exists()


def test_a_refused_grow_leaves_no_empty_folder_it_made(tmp_path, capsys):
    new = tmp_path / "new"
    one_line_error(capsys, "grow", JOB, f"--set=storage={new / 'deeper' / 'run'}",
                   f"--set=data.root={tmp_path / 'nowhere'}")
    assert not new.exists()
    mine = tmp_path / "mine"  # the user's own empty folder stays
    mine.mkdir()
    one_line_error(capsys, "grow", JOB, f"--set=storage={mine}",
                   f"--set=data.root={tmp_path / 'nowhere'}")
    assert mine.is_dir() and not any(mine.iterdir())
    assert not ray.is_initialized()


def test_predict_on_a_folder_names_the_unreadable_images_and_classifies_the_rest(
        ckpt, cats_dogs_subset, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    good = sorted((cats_dogs_subset / "test_set" / "cats").glob("*.jpg"))[:2]
    for image in good:
        (folder / image.name).write_bytes(image.read_bytes())
    (folder / "notes.jpg").write_text("not a picture")
    (folder / "half.jpg").write_bytes(good[0].read_bytes()[:2000])
    (folder / ".DS_Store").write_bytes(b"\0")
    (folder / "more").mkdir()
    status, out, err = run_cli(capsys, "predict", ckpt, folder)
    assert status == 1
    assert [line.split("\t")[0] for line in out.splitlines()] == [
        str(folder / image.name) for image in good]
    skipped = sorted(err.splitlines())
    assert len(skipped) == 2, err
    assert skipped[0].startswith(f"runner: skipped {folder / 'half.jpg'}: cannot "
                                 "decode: truncated")
    assert skipped[1].startswith(f"runner: skipped {folder / 'notes.jpg'}: cannot "
                                 "decode: not_an_image")


def test_a_fractional_count_param_names_the_param(ckpt, tmp_path, capsys):
    out = tmp_path / "grown"
    line = one_line_error(capsys, "transfer", "--from", ckpt, "--op", "widen_conv",
                          "--param", "block=0", "--param", "layer=0",
                          "--param", "filters=1.5", "--out", out)
    assert line == ("runner: error: widen_conv filters must be a whole number, "
                    "got 1.5")
    assert not out.exists()


def test_no_pickle_protocol_warning_for_a_checkpoint_that_loads_safely(
        ckpt, cats_dogs_subset, tmp_path, capsys, recwarn):
    folder = tmp_path / "protocol3"
    folder.mkdir()
    for name in ("spec.json", "meta.json"):
        (folder / name).write_bytes((ckpt / name).read_bytes())
    _, state, _ = load_checkpoint(ckpt)
    torch.save(state, folder / "model.pt", pickle_protocol=3)
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps(
        {**meta, "sha256": _sha256(folder / "model.pt")}))
    image = min((cats_dogs_subset / "test_set" / "dogs").glob("*.jpg"))
    status, out, _ = run_cli(capsys, "predict", folder, image)
    assert status == 0 and out.startswith(f"{image}\t")
    assert not [w for w in recwarn if "pickle protocol" in str(w.message)]
    load_checkpoint(folder)
    assert not [w for w in recwarn if "pickle protocol" in str(w.message)]
    torch.load(folder / "model.pt", weights_only=True)  # torch itself warns,
    assert [w for w in recwarn if "pickle protocol" in str(w.message)]  # seen here


def test_a_moved_run_uses_its_own_checkpoints_not_the_original_s(
        ckpt, tmp_path, capsys):
    import shutil

    from runner.cli import _target
    original, moved = tmp_path / "original", tmp_path / "moved"
    winner = original / "widen" / "train" / "t" / "epoch-003"
    shutil.copytree(ckpt, winner)
    (original / "lineage.json").write_text(json.dumps({
        "run": "cats_dogs", "storage": str(original), "data": {},
        "stages": [{"name": "widen", "checkpoint": str(winner)}]}))
    shutil.move(original, moved)
    checkpoint, _, _ = _target(str(moved))
    assert checkpoint == str(moved / "widen" / "train" / "t" / "epoch-003")
    status, _, err = run_cli(capsys, "export", moved, "--format", "torchscript",
                             "--out", tmp_path / "model.ts")
    assert status == 0, err
    assert (tmp_path / "model.ts").stat().st_size > 0

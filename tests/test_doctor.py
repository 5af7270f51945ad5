"""`runner doctor` on real data, real folders and a real local Ray.

The tests without Ray come first: the module's Ray fixture starts a cluster
at its first use and keeps it until the module ends.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from runner.cli import main

ROOT = Path(__file__).resolve().parents[1]
JOB = "jobs/cats_dogs.yaml"


def doctor(capsys, *argv) -> tuple[int, list[str]]:
    status = main(["doctor", *map(str, argv)])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return status, out.splitlines()


def doctor_process(*argv, env=None) -> tuple[int, list[str]]:
    """The installed command in its own process, as a user runs it."""
    runner = Path(sys.executable).with_name("runner")
    done = subprocess.run([str(runner), "doctor", *map(str, argv)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert "Traceback" not in done.stdout + done.stderr, done.stderr
    return done.returncode, done.stdout.splitlines()


def lines_with(lines: list[str], status: str) -> list[str]:
    return [line for line in lines if line.startswith(status)]


def running_clusters() -> list[str]:
    from ray._private.services import find_gcs_addresses
    return list(find_gcs_addresses())


@pytest.fixture
def data(cats_dogs_subset, tmp_path) -> Path:
    """A private copy of the real subset, free to break."""
    return Path(shutil.copytree(cats_dogs_subset, tmp_path / "data"))


# --- without Ray ------------------------------------------------------------------


def test_no_ray_running_is_not_a_failure_and_starts_nothing(capsys, data, tmp_path,
                                                            monkeypatch):
    import ray
    if running_clusters():
        pytest.skip("a Ray cluster already runs on this machine")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    status, lines = doctor(capsys, JOB, "--set", f"storage={tmp_path}/run",
                           "--set", f"data.root={data}", "--set", "ray.num_cpus=3")
    assert status == 0, lines
    assert not lines_with(lines, "FAIL")
    assert ("ok   no Ray cluster running; `runner grow` will start a local one "
            "with 3 CPUs") in lines
    assert any(line.startswith("ok   CPU plan:") and "of 3 CPUs" in line
               for line in lines), lines
    assert not ray.is_initialized()
    assert running_clusters() == []
    # the storage probe leaves no folder behind
    assert not (tmp_path / "run").exists()


def test_without_a_job_only_the_machine_is_checked(capsys, monkeypatch):
    if running_clusters():
        pytest.skip("a Ray cluster already runs on this machine")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    status, lines = doctor(capsys)
    assert status == 0, lines
    assert lines[0].startswith("ok   Python ") and "torch " in lines[0]
    assert any(line.startswith("warn no job file given") for line in lines)
    assert f"with {os.cpu_count()} CPUs" in "\n".join(lines)
    assert not any("CPU plan" in line or "storage root" in line for line in lines)


@pytest.mark.parametrize("damage, named", [
    ("no_test_set", "test_set"),
    ("empty_class", "training_set/dogs"),
])
def test_bad_data_folder_fails_naming_the_folder(capsys, data, tmp_path, damage,
                                                 named):
    if damage == "no_test_set":
        shutil.rmtree(data / "test_set")
    else:
        for f in (data / "training_set" / "dogs").iterdir():
            f.unlink()
    status, lines = doctor(capsys, JOB, "--set", f"storage={tmp_path}/run",
                           "--set", f"data.root={data}")
    assert status == 1
    fails = lines_with(lines, "FAIL")
    assert len(fails) == 1, lines
    assert str(data) in fails[0] and named in fails[0]
    assert f"data.root in {JOB}" in fails[0]


def test_unwritable_storage_root_fails_naming_it(capsys, data, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    root = blocker / "runs"
    status, lines = doctor(capsys, JOB, "--set", f"storage={root}",
                           "--set", f"data.root={data}")
    assert status == 1
    fails = lines_with(lines, "FAIL")
    assert len(fails) == 1, lines
    assert f"storage root {root} is not writable" in fails[0]
    assert "set storage in" in fails[0]
    assert blocker.read_text() == "not a folder"


def test_a_bad_job_file_is_one_failed_line(capsys):
    status, lines = doctor(capsys, JOB, "--set", "train.wrokers=2")
    assert status == 1
    fails = lines_with(lines, "FAIL")
    assert len(fails) == 1 and JOB in fails[0]
    assert "unknown setting train.wrokers (did you mean 'workers'?)" in fails[0]


def checked(check, *argv) -> list[tuple[str, str]]:
    """One check's lines for a job, run alone (no Ray is looked for)."""
    from runner.doctor import Context, check_job
    ctx = Context(job_path=str(argv[0]), overrides=[str(a) for a in argv[1:]])
    assert check_job(ctx)[0][0] == "ok"
    return check(ctx)


def test_data_counts_image_files_not_other_files(data, tmp_path):
    from runner.doctor import check_data
    for name in ("README.txt", "labels.csv"):
        (data / "training_set" / "cats" / name).write_text("notes")
    [(status, text)] = checked(check_data, JOB, f"data.root={data}")
    assert status == "ok"
    assert text == (f"data {data}: image files per class: train cats 40, dogs 40; "
                    "test cats 20, dogs 20; 2 other files (kept only if it "
                    "decodes as an image)")


def test_a_class_folder_without_image_names_warns_naming_it(data, tmp_path):
    from runner.doctor import check_data
    for jpeg in (data / "test_set" / "dogs").iterdir():
        jpeg.rename(jpeg.with_suffix(".txt"))
    [(status, text)] = checked(check_data, JOB, f"data.root={data}")
    assert status == "warn"
    assert f"no file named like an image (.jpg, .png, ...) in {data}/test_set/dogs" \
        in text
    assert f"data.root in {JOB}" in text


def init_job(tmp_path, data, init) -> Path:
    job = tmp_path / "from_init.yaml"
    job.write_text(f"name: from_init\nstorage: {tmp_path}/run\n"
                   f"data: {{root: {data}}}\n"
                   f"stages:\n  - {{name: seed, init: {init}, epochs: 1}}\n")
    return job


def test_a_first_stage_init_checkpoint_is_checked(data, tmp_path):
    import json

    import torch

    from runner.doctor import check_init
    from runner.model import build_model, classifier_1, classifier_2, save_checkpoint
    good = save_checkpoint(tmp_path / "good", classifier_1(),
                           build_model(classifier_1()).state_dict(), {})
    assert checked(check_init, JOB) == []  # the job starts from a spec
    [(status, text)] = checked(check_init, init_job(tmp_path, data, good))
    assert status == "ok"
    assert text == f"init checkpoint {good}: classifier_1, 4,195,457 parameters, loads"

    missing = tmp_path / "nope"
    job = init_job(tmp_path, data, missing)
    [(status, text)] = checked(check_init, job)
    assert status == "FAIL" and text.startswith(f"init checkpoint {missing}: no such")
    assert f"stages[0].init (seed) in {job}" in text

    swapped = Path(shutil.copytree(good, tmp_path / "swapped"))
    (swapped / "spec.json").write_text(json.dumps(classifier_2().to_dict()))
    [(status, text)] = checked(check_init, init_job(tmp_path, data, swapped))
    assert status == "FAIL" and "weights do not fit spec 'classifier_2'" in text

    torch.save({"x": [1]}, swapped / "model.pt")  # not tensors, wrong checksum
    [(status, text)] = checked(check_init, init_job(tmp_path, data, swapped))
    assert status == "FAIL" and "corrupt or truncated" in text


def test_every_variant_is_grown_on_paper(data, tmp_path):
    from runner.doctor import check_growth
    [(status, text)] = checked(check_growth, JOB)
    assert (status, text) == ("ok", "growth: all 7 variants of 2 growth stages "
                                    "build, checked on paper")
    bad = "stages.2.variants=[{op: widen_conv, block: 5, layer: 0, filters: 64}]"
    [(status, text)] = checked(check_growth, JOB, bad)
    assert status == "FAIL" and "stages[2] (widen).variants[0] (widen_conv)" in text
    assert text.endswith(f"; fix it in {JOB}")
    # a job starting from a checkpoint that does not load: only check_init fails
    from runner.doctor import Context, check_init, check_job
    ctx = Context(job_path=str(init_job(tmp_path, data, tmp_path / "nope")))
    check_job(ctx)
    assert check_init(ctx)[0][0] == "FAIL" and check_growth(ctx) == []


# --- against a real local Ray (2 CPUs) ----------------------------------------------


def test_all_good_against_a_running_cluster(ray_local, data, tmp_path):
    gcs = ray_local.get_runtime_context().gcs_address
    status, lines = doctor_process(JOB, "--address", gcs,
                                   "--set", f"storage={tmp_path}/run",
                                   "--set", f"data.root={data}")
    assert status == 0, lines
    assert not lines_with(lines, "FAIL")
    text = "\n".join(lines)
    assert f"ok   Ray cluster at {gcs} (--address): 2 CPUs on 1 node" in text
    assert "ok   Ray nodes: 127.0.0.1 (2 CPUs)" in text
    assert "dashboard / job server at http://127.0.0.1:" in text
    assert (f"ok   data {data}: image files per class: train cats 40, dogs 40; "
            "test cats 20, dogs 20") in text
    assert "= 2 of 2 CPUs (the running cluster)" in text
    assert "ok   each training worker runs " in text
    assert f"ok   storage root {tmp_path}/run writable" in text
    assert not (tmp_path / "run").exists()


def test_a_job_wanting_more_cpus_than_the_cluster_fails_with_the_numbers(
        ray_local, data, tmp_path):
    # no --address and no RAY_ADDRESS: doctor finds the running cluster itself
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    status, lines = doctor_process(JOB, "--set", f"storage={tmp_path}/run",
                                   "--set", f"data.root={data}",
                                   "--set", "train.workers=2",
                                   "--set", "train.cpus_per_worker=2", env=env)
    assert status == 1
    assert any("(found running on this machine): 2 CPUs" in line for line in lines)
    fails = lines_with(lines, "FAIL")
    assert len(fails) == 1, lines
    assert "a trial needs 4.5 CPUs (2 training workers x 2 + 0.5 for " \
           "augmentation) but the Ray cluster has 2" in fails[0]
    assert "train.cpus_per_worker" in fails[0]


def test_a_cluster_found_here_is_joined_with_its_token(ray_local, data, tmp_path):
    # As runner.cluster.connect: "auto", so Ray sends ~/.ray/auth_token even
    # where RAY_AUTH_MODE is not set in the environment.
    gcs = ray_local.get_runtime_context().gcs_address
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    status, lines = doctor_process(JOB, "--set", f"storage={tmp_path}/run",
                                   "--set", f"data.root={data}", env=env)
    assert status == 0, lines
    assert f"ok   Ray cluster at {gcs} (found running on this machine): 2 CPUs " \
           "on 1 node" in lines


def test_joining_without_the_token_fails_saying_how_to_send_it(ray_local, tmp_path):
    # the fixture's cluster uses Ray's default token auth
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        pytest.skip("this Ray runs without token auth")
    gcs = ray_local.get_runtime_context().gcs_address
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    status, lines = doctor_process("--address", gcs, env=env)
    assert status == 1
    fails = lines_with(lines, "FAIL")
    assert len(fails) == 1, lines
    assert f"cannot join Ray at {gcs} (--address)" in fails[0]
    assert "set RAY_AUTH_MODE=token" in fails[0]


def test_the_training_precision_is_said_and_forced_bf16_without_it_warns(monkeypatch):
    from runner.doctor import check_precision
    from runner.train import precision
    [(status, text)] = checked(check_precision, JOB)
    assert status == "ok" and text.startswith(
        f"training precision here: {precision.resolve('auto')} (auto, this CPU has ")
    monkeypatch.setattr(precision, "native_bf16", lambda: (False, "no AVX512-BF16 or AMX"))
    [(status, text)] = checked(check_precision, JOB)
    assert (status, text) == ("ok", "training precision here: fp32 (auto, this CPU "
                                    "has no AVX512-BF16 or AMX)")
    [(status, text)] = checked(check_precision, JOB, "train.precision=bf16")
    assert status == "warn" and "emulated, slower than fp32" in text
    assert text.endswith(f"set train.precision to auto or fp32 in {JOB}")


def test_a_job_changed_against_the_run_in_its_storage_root_fails(data, tmp_path):
    import yaml

    from runner.config import load_job
    from runner.doctor import check_resume
    job = load_job(str(JOB), [f"storage={tmp_path}", f"data.root={data}"])
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job.to_dict(), sort_keys=False))
    assert checked(check_resume, JOB, f"storage={tmp_path}", f"data.root={data}") == []
    [(status, text)] = checked(check_resume, JOB, f"storage={tmp_path}",
                               f"data.root={data}", "train.precision=fp32")
    assert status == "FAIL" and "(train.precision: auto -> fp32)" in text
    assert text.startswith(f"{tmp_path} holds a run started with other settings")

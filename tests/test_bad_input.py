"""Bad settings and paths stop a run with one line, before any cluster work."""

import pytest
import ray

from runner.cli import main
from runner.config import load_job
from runner.errors import RunnerError
from runner.resources import plan


def grow(capsys, *sets):
    code = main(["grow", "jobs/cats_dogs.yaml", *[f"--set={s}" for s in sets]])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def test_missing_data_folder_is_named_before_ray_starts(tmp_path, capsys):
    code, err = grow(capsys, f"storage={tmp_path / 'run'}",
                     f"data.root={tmp_path / 'nowhere'}")
    assert code == 2
    assert err[-1].startswith("runner: error:") and "nowhere" in err[-1]
    assert not ray.is_initialized()


def test_empty_class_folder_is_named_before_ray_starts(tmp_path, capsys,
                                                      cats_dogs_subset):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(cats_dogs_subset, data)
    for f in (data / "test_set" / "dogs").iterdir():
        f.unlink()
    code, err = grow(capsys, f"storage={tmp_path / 'run'}", f"data.root={data}")
    assert code == 2 and "dogs" in err[-1] and "runner: error:" in err[-1]
    assert not ray.is_initialized()


def test_unwritable_storage_root_is_reported_before_training(tmp_path, capsys,
                                                            cats_dogs_subset):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, err = grow(capsys, f"storage={blocker / 'run'}",
                     f"data.root={cats_dogs_subset}")
    assert code == 2 and "not writable" in err[-1] and str(blocker) in err[-1]
    assert not ray.is_initialized()


def test_unknown_setting_on_the_command_line(capsys):
    code, err = grow(capsys, "train.wrokers=2")
    assert code == 2 and err == ["runner: error: unknown setting train.wrokers "
                                 "(did you mean 'workers'?)"]


def test_more_cpus_than_the_cluster_has_is_refused_with_numbers():
    job = load_job("jobs/cats_dogs.yaml", ["train.workers=8",
                                           "train.cpus_per_worker=1"])
    with pytest.raises(RunnerError, match=r"needs 8.5 CPUs .* has 2"):
        plan(job, cluster_cpus=2)


def test_default_split_is_one_single_threaded_worker_per_core():
    job = load_job("jobs/cats_dogs.yaml")
    p = plan(job, cluster_cpus=2)
    assert (p.workers, p.cpus_per_worker, p.threads_per_worker, p.aug_cpus,
            p.aug_tasks, p.task_cpus) == (2, 0.75, 1, 0.5, 1, 0.5)
    assert (p.batch_per_worker, p.batch_size) == (64, 128)  # the job's batch
    p = plan(job, cluster_cpus=16, nodes=4)
    assert (p.workers, p.threads_per_worker, p.batch_per_worker) == (16, 1, 8)
    assert p.trial_cpus <= 16


def test_augmentation_tasks_fit_beside_the_workers_on_a_node():
    # 4 workers of 3.6 CPUs leave 0.4 CPUs on each 4-CPU node: a task of 0.5
    # would never be placed and the trainers would wait forever.
    job = load_job("jobs/cats_dogs.yaml", ["train.workers=4"])
    p = plan(job, cluster_cpus=16, nodes=4)
    node_spare = 4 - p.cpus_per_worker
    assert p.task_cpus <= node_spare + 1e-9 and p.aug_tasks >= 1
    tight = load_job("jobs/cats_dogs.yaml", ["train.workers=2", "augment.cpus=0.06",
                                             "train.cpus_per_worker=1.97"])
    with pytest.raises(RunnerError, match=r"leave 0.03 CPUs free on a node"):
        plan(tight, cluster_cpus=4, nodes=2)
    with pytest.raises(RunnerError, match=r"augment.cpus 0.02 is too little"):
        plan(load_job("jobs/cats_dogs.yaml", ["augment.cpus=0.02"]), cluster_cpus=2)


def test_cpus_per_worker_alone_sets_how_many_workers_fit():
    job = load_job("jobs/cats_dogs.yaml", ["train.cpus_per_worker=1.5"])
    p = plan(job, cluster_cpus=8, nodes=2)
    assert (p.workers, p.threads_per_worker) == (4, 2)  # 3.6 CPUs a node


def test_a_worker_larger_than_a_node_is_refused_with_numbers():
    job = load_job("jobs/cats_dogs.yaml", ["train.workers=1"])
    with pytest.raises(RunnerError, match=r"needs 14.4 CPUs but a node has 4"):
        plan(job, cluster_cpus=16, nodes=4)


@pytest.mark.parametrize("make, words", [
    (lambda p: p.write_bytes(bytes(range(128, 256))), "not UTF-8 text"),
    (lambda p: p.mkdir(), "is a folder, not a file"),
])
def test_job_files_that_are_not_text_files(tmp_path, capsys, make, words):
    job = tmp_path / "job.yaml"
    make(job)
    assert main(["grow", str(job)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"runner: error: job file {job}: {words}"]


@pytest.mark.parametrize("text", ["[1, 2]", "{}", '{"run": "x"}'])
def test_a_lineage_of_the_wrong_shape_is_refused(tmp_path, capsys, text):
    (tmp_path / "lineage.json").write_text(text)
    assert main(["report", str(tmp_path)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "not a runner lineage" in line and "lineage.json" in line


def test_a_missing_init_checkpoint_is_named_before_ray_starts(tmp_path, capsys,
                                                              cats_dogs_subset):
    code, err = grow(capsys, f"storage={tmp_path / 'run'}",
                     f"data.root={cats_dogs_subset}", "stages.0.model=null",
                     f"stages.0.init={tmp_path / 'no-such-checkpoint'}")
    assert code == 2
    assert err[-1].startswith("runner: error: stages[0].init")
    assert "no-such-checkpoint" in err[-1]
    assert not ray.is_initialized()


def test_a_damaged_init_checkpoint_is_named_before_ray_starts(tmp_path, capsys,
                                                              cats_dogs_subset):
    import torch

    from runner.model import build_model, get_spec
    from runner.model.checkpoint import save_checkpoint

    spec = get_spec("classifier_1")
    torch.manual_seed(0)
    folder = save_checkpoint(tmp_path / "ckpt", spec, build_model(spec).state_dict(),
                             {"epoch": 0})
    model = next(p for p in folder.iterdir() if p.suffix == ".pt")
    model.write_bytes(model.read_bytes()[:1000])
    code, err = grow(capsys, f"storage={tmp_path / 'run'}",
                     f"data.root={cats_dogs_subset}", "stages.0.model=null",
                     f"stages.0.init={tmp_path / 'ckpt'}")
    assert code == 2
    assert err[-1].startswith("runner: error: stages[0].init")
    assert not ray.is_initialized()


def test_a_root_holding_another_run_is_refused_and_left_as_it_was(
        tmp_path, capsys, cats_dogs_subset):
    import json

    run = tmp_path / "run"
    run.mkdir()
    (run / "job.yaml").write_text("name: theirs\n")
    lineage = {"run": "theirs", "stages": [{"name": "other"}], "finished": True}
    (run / "lineage.json").write_text(json.dumps(lineage))
    code, err = grow(capsys, f"storage={run}", f"data.root={cats_dogs_subset}")
    assert code == 2 and "other stages" in err[-1]
    assert (run / "job.yaml").read_text() == "name: theirs\n"
    assert json.loads((run / "lineage.json").read_text()) == lineage
    assert not ray.is_initialized()


def test_a_job_refused_for_its_cpus_records_nothing_that_blocks_its_fix(
        tmp_path, capsys, cats_dogs_subset):
    from runner.growth.loop import check_resume
    run = tmp_path / "run"
    sets = [f"storage={run}", f"data.root={cats_dogs_subset}", "ray.num_cpus=2"]
    try:
        code, err = grow(capsys, *sets, "train.cpus_per_worker=3")
    finally:
        ray.shutdown()  # the CLI's local Ray, started to learn its CPUs
    assert code == 2 and "a trial needs 3.5 CPUs" in err[-1]
    assert not (run / "job.yaml").exists()
    check_resume(load_job("jobs/cats_dogs.yaml", sets))  # the fixed job may run

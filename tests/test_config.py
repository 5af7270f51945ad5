import pytest

from runner.config import load_job
from runner.errors import RunnerError

JOB = """
name: t
storage: {storage}
data: {{root: /data}}
stages:
  - {{name: seed, model: classifier_1, epochs: 1}}
  - name: grow
    epochs: 1
    variants: [{{op: plain_copy, to: classifier_2}}, {{op: deepen_block}}]
"""


def write(tmp_path, text=None, **fmt):
    path = tmp_path / "job.yaml"
    path.write_text(text if text is not None else JOB.format(storage=tmp_path / "run"))
    return str(path)


def test_the_shipped_job_file_loads():
    job = load_job("jobs/cats_dogs.yaml")
    assert job.stages[0].model == "classifier_1"
    assert len(job.stages[1].variants) >= 2


def test_overrides_reach_nested_and_listed_settings(tmp_path):
    job = load_job(write(tmp_path), ["stages.1.epochs=3", "train.workers=4",
                                     "data.root=/elsewhere"])
    assert (job.stages[1].epochs, job.train.workers, job.data.root) == \
        (3, 4, "/elsewhere")


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    text = JOB.format(storage="x").replace("name: t", "name: t\nseeed: 1")
    path = write(tmp_path, text)
    with pytest.raises(RunnerError, match=r"unknown setting seeed.*mean 'seed'"):
        load_job(path)


def test_unknown_nested_key(tmp_path):
    with pytest.raises(RunnerError, match=r"train.wokers.*'workers'"):
        load_job(write(tmp_path), ["train.wokers=2"])


@pytest.mark.parametrize("override, words", [
    ("stages.0.epochs=0", "epochs must be a positive"),
    ("train.workers=-1", "train.workers must be a positive"),
    ("data.image_size=0", "data.image_size must be a positive"),
    ("data.image_size=100", "must not exceed data.base_size"),
    ("train.batch_size=abc", "train.batch_size must be a positive"),
    ("data.val_fraction=1.5", "val_fraction"),
    ("stages.0.epochs=1.5", "epochs must be a positive whole number"),
    ("train.batch_size=12.5", "train.batch_size must be a positive whole"),
    ("augment.views_per_epoch=2.5", "views_per_epoch must be a positive whole"),
    ("data.base_size=72.5", "data.base_size must be a positive whole"),
    ("ray.num_cpus=abc", "ray.num_cpus must be a positive whole"),
    ("ray.num_cpus=0", "ray.num_cpus must be a positive whole"),
    ("seed=1.5", "seed must be a whole number, 0 or more"),
    ("seed=-1", "seed must be a whole number, 0 or more"),
    # names the run folder keeps for its own files and folders
    ("stages.1.name=data", r"stages\[1\].name 'data' is taken"),
    ("stages.0.name=baseline", "'baseline' is taken"),
    ("stages.0.name=lineage.json", r"stages\[0\].name 'lineage.json' is taken"),
    ("stages.0.name=live.json", "'live.json' is taken"),
    ("stages.0.name=job.yaml", "'job.yaml' is taken"),
    ("stages.0.name=report.html", "'report.html' is taken"),
    ("stages.0.name=eval-data", "'eval-data' is taken"),
])
def test_bad_values_are_refused_by_name(tmp_path, override, words):
    with pytest.raises(RunnerError, match=words):
        load_job(write(tmp_path), [override])


def test_growth_stage_needs_known_ops(tmp_path):
    with pytest.raises(RunnerError, match="op:` one of"):
        load_job(write(tmp_path), ["stages.1.variants=[{op: grow_wings}]"])


def test_missing_and_malformed_job_files(tmp_path):
    with pytest.raises(RunnerError, match="no such file"):
        load_job(str(tmp_path / "nope.yaml"))
    with pytest.raises(RunnerError, match="not valid YAML"):
        load_job(write(tmp_path, "stages: [unclosed"))


def test_the_job_a_run_writes_loads_back_as_the_same_job(tmp_path):
    import yaml

    job = load_job("jobs/cats_dogs.yaml")
    written = tmp_path / "job.yaml"
    written.write_text(yaml.safe_dump(job.to_dict(), sort_keys=False))
    assert load_job(str(written)).to_dict() == job.to_dict()


@pytest.mark.parametrize("stages, words", [
    ("[{name: a, model: classifier_1, init: runs/x}]", "not both"),
    ("[{name: a, epochs: 1}]", "needs `model:` (a spec) or `init:`"),
    ("[{name: a, model: classifier_1}, {name: b, init: x, variants: [{op: fresh}]}]",
     "only the first stage starts from `init:`"),
])
def test_init_is_for_the_first_stage_instead_of_a_model(stages, words):
    with pytest.raises(RunnerError, match=words.replace("(", r"\(").replace(")", r"\)")):
        load_job("jobs/cats_dogs.yaml", [f"stages={stages}"])


def test_a_stage_budget_takes_the_same_units_as_a_trial_budget():
    job = load_job("jobs/cats_dogs.yaml", ["stages.1.stage_budget={flops: 2.0e12}"])
    assert job.stages[1].stage_budget == {"flops": 2.0e12}
    with pytest.raises(RunnerError, match=r"stage_budget: unknown unit 'epochs'"):
        load_job("jobs/cats_dogs.yaml", ["stages.1.stage_budget={epochs: 3}"])


def test_a_relative_init_checkpoint_is_resolved_where_the_command_runs(
        tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job = load_job(write(tmp_path), ["stages.0.model=null",
                                     "stages.0.init=runs/imported"])
    assert job.stages[0].init == str(tmp_path / "runs" / "imported")
    uri = load_job(write(tmp_path), ["stages.0.model=null",
                                     "stages.0.init=s3://bucket/imported"])
    assert uri.stages[0].init == "s3://bucket/imported"


@pytest.mark.parametrize("variant, words", [
    ("{op: combine}", "needs `steps:`"),
    ("{op: combine, steps: [{op: deepen_block}]}", "two or more"),
    ("{op: combine, steps: [{op: deepen_block}, {op: fresh}]}", "combine step"),
])
def test_a_combined_variant_needs_two_known_steps(tmp_path, variant, words):
    with pytest.raises(RunnerError, match=words):
        load_job(write(tmp_path), [f"stages.1.variants=[{variant}]"])


def test_a_combined_variant_loads():
    job = load_job("jobs/cats_dogs.yaml", [
        "stages.2.variants=[{op: combine, steps: [{op: deepen_block},"
        " {op: widen_dense, index: 0, units: 256}]}]"])
    assert job.stages[2].variants[0]["steps"][1]["units"] == 256

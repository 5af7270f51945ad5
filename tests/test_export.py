"""runner export on a real (untrained, seeded) checkpoint: the files it writes
are loaded in a separate Python that cannot import runner, with torch.jit.load
or onnxruntime alone, and must give the model's probabilities on real JPEGs."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from runner.cli import main
from runner.model import build_model, classifier_2, save_checkpoint

FORMATS = {"torchscript": "model.ts", "onnx": "model.onnx"}

# Runs under `python -I` from a temporary folder; importing runner is blocked,
# so the file must carry everything. Prints probabilities for the whole batch,
# for the first image alone (batch size 1) and the file's metadata as JSON.
LOAD = r"""
import json, sys
sys.modules["runner"] = None  # any attempt to import runner now fails
import numpy as np
fmt, path, images = sys.argv[1:]
x = np.load(images)
if fmt == "torchscript":
    import torch
    extra = {"runner.json": ""}
    model = torch.jit.load(path, _extra_files=extra)
    meta = json.loads(extra["runner.json"])
    run = lambda a: model(torch.from_numpy(a)).numpy()  # no no_grad needed
else:
    import onnxruntime as ort
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    run = lambda a: session.run(None, {"image": a})[0]
assert sys.modules["runner"] is None
assert not [m for m in sys.modules if m.startswith("runner.")]
print(json.dumps({"probs": run(x).tolist(), "one": run(x[:1]).tolist(),
                  "meta": meta}))
"""


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """classifier_2 with seeded random weights; meta names the classes."""
    torch.manual_seed(0)
    state = build_model(classifier_2()).state_dict()
    folder = tmp_path_factory.mktemp("ckpt") / "epoch-000"
    save_checkpoint(folder, classifier_2(), state,
                    {"epoch": 0, "classes": ["cats", "dogs"]})
    return folder


def expected(folder, images) -> np.ndarray:
    """The original model's P(dogs) on ``images``, computed in this process."""
    from runner.model import load_checkpoint
    spec, state, _ = load_checkpoint(folder)
    model = build_model(spec)
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        return torch.sigmoid(model(images)).numpy()


def run_cli(capsys, *argv):
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def load_outside(fmt, path, images, folder) -> dict:
    """Load ``path`` in `python -I` run from ``folder`` and predict on ``images``."""
    npy = folder / "images.npy"
    np.save(npy, images.numpy().astype(np.float32))
    proc = subprocess.run([sys.executable, "-I", "-c", LOAD, fmt, str(path), str(npy)],
                          cwd=folder, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize("fmt", FORMATS)
def test_exported_file_predicts_like_the_model_without_runner(
        fmt, ckpt, real_images, tmp_path, capsys):
    out = tmp_path / "exported" / FORMATS[fmt]
    status, stdout, err = run_cli(capsys, "export", ckpt, "--format", fmt,
                                  "--out", out)
    assert status == 0, err
    assert stdout.strip() == f"wrote {out}"
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no temp

    images, _ = real_images
    got = load_outside(fmt, out, images, tmp_path)
    want = expected(ckpt, images)
    probs = np.array(got["probs"])
    assert probs.shape == (16, 1)
    assert np.abs(probs - want).max() <= 1e-4
    assert np.abs(np.array(got["one"]) - want[:1]).max() <= 1e-4

    meta = got["meta"]
    if fmt == "onnx":  # metadata_props are strings; lists and numbers are JSON
        meta = {k: json.loads(v) if k in ("classes", "input_size") else v
                for k, v in meta.items()}
    assert meta["classes"] == ["cats", "dogs"]
    assert meta["input_size"] == 64
    assert "P(dogs)" in meta["output"]
    assert "to 72 x 72, then to 64 x 64" in meta["preprocess"]  # as runner does


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_a_run_root_exports_its_winner_with_the_runs_class_names(
        tmp_path, capsys, monkeypatch):
    # a checkpoint whose meta has no classes, inside a run whose lineage has
    torch.manual_seed(1)
    run = tmp_path / "run"
    winner = run / "deepen" / "train" / "t0" / "epoch-001"
    save_checkpoint(winner, classifier_2(), build_model(classifier_2()).state_dict(),
                    {"epoch": 1})
    (run / "lineage.json").write_text(json.dumps({
        "stages": [{"checkpoint": str(winner)}],
        "data": {"classes": ["cats", "dogs"]}}))
    monkeypatch.chdir(tmp_path)

    status, stdout, err = run_cli(capsys, "export", run, "--format", "torchscript")
    assert status == 0, err
    assert stdout.strip() == "wrote model.ts"  # the default: in the current folder
    extra = {"runner.json": ""}
    torch.jit.load(tmp_path / "model.ts", _extra_files=extra)
    assert json.loads(extra["runner.json"])["classes"] == ["cats", "dogs"]


def fails(capsys, *argv) -> str:
    """The one-line error of a command that must exit with status 2."""
    status, _, err = run_cli(capsys, *argv)
    assert status == 2
    assert err.count("\n") == 1 and err.startswith("runner: error: ")
    return err


def test_a_missing_checkpoint_or_unknown_format_is_one_line(ckpt, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    err = fails(capsys, "export", tmp_path / "nope", "--format",
                                  "onnx", "--out", out)
    assert "no such run or checkpoint folder" in err
    err = fails(capsys, "export", ckpt, "--format", "tflite",
                                  "--out", out)
    assert "unknown --format 'tflite'; known: torchscript, onnx" in err
    assert list(tmp_path.iterdir()) == []


def test_a_tampered_checkpoint_is_refused_and_the_old_file_kept(
        ckpt, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    weights = bytearray((bad / "model.pt").read_bytes())
    weights[-100] ^= 0xFF
    (bad / "model.pt").write_bytes(bytes(weights))
    out = tmp_path / "out" / "model.ts"
    out.parent.mkdir()
    out.write_bytes(b"an earlier export")

    err = fails(capsys, "export", bad, "--format", "torchscript",
                                  "--out", out)
    assert "sha256 differs" in err and str(bad / "model.pt") in err
    assert list(out.parent.iterdir()) == [out]
    assert out.read_bytes() == b"an earlier export"


def test_an_unwritable_out_is_one_line(ckpt, tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a folder")
    for out, message in ((tmp_path / "a_file" / "model.ts", "cannot write"),
                         (tmp_path, "is a folder"),
                         (ckpt / "model.pt", "would overwrite a checkpoint file")):
        err = fails(capsys, "export", ckpt, "--format",
                                      "torchscript", "--out", out)
        assert message in err and str(out) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]

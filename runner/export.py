"""Export a checkpoint to one file that runs without runner: TorchScript or ONNX.

The exported graph is the classifier with its output activation appended, so
it maps images to probabilities: input ``image``, float32 N x C x S x S (RGB,
values in [0, 1], S the spec's input size), output ``probability``, N x 1 =
P(second class) for a one-logit binary model (sigmoid; above 0.5 means the
second class), N x K class probabilities (softmax) otherwise. The batch size
is free. Class names, input size and this description travel inside the file
(:func:`describe`): TorchScript as the extra file ``runner.json``, ONNX as
metadata_props (JSON-encoded where not a string).

Each exporter builds the file in memory, reloads it with the runtime a user
would use (``torch.jit.load``, onnxruntime) and checks it against the eager
model on a batch of another size than the one it was traced with, so a batch
size baked into the graph is caught; only then is it written, to a temporary
sibling renamed into place, so a failed export never leaves half a file.
ONNX goes through ``torch.onnx.export``'s default (torch.export-based)
exporter with a dynamic batch dimension; it needs the ``onnx`` extra.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from runner.errors import RunnerError
from runner.model import build_model
from runner.model.checkpoint import FILES
from runner.model.spec import ModelSpec

METADATA = "runner.json"  # the TorchScript extra file
INPUT, OUTPUT = "image", "probability"
TRACE_BATCH, CHECK_BATCH = 2, 3  # different, so a fixed batch size shows
TOLERANCE = 1e-5  # max |probability difference| from the eager model
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
ONNX_LOGGERS = ("onnx_ir", "onnxscript", "torch.onnx")


class Probabilities(nn.Module):
    """The classifier followed by sigmoid (one logit) or softmax (several)."""

    def __init__(self, model: nn.Module, binary: bool):
        super().__init__()
        self.model = model
        self.binary = binary

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logits = self.model(image)
        return torch.sigmoid(logits) if self.binary else torch.softmax(logits, 1)


def describe(spec: ModelSpec, meta: dict) -> dict:
    """What a user needs to run the file: classes, input size, output meaning,
    and, when ``meta`` has ``base_size``, the resizing runner's own predict does."""
    count = max(2, spec.num_outputs)
    classes = meta.get("classes")
    if not (isinstance(classes, list) and len(classes) == count):
        classes = [f"class {k}" for k in range(count)]
    size, channels = spec.input_size, spec.in_channels
    if spec.num_outputs == 1:
        output = (f"{OUTPUT}: float32 N x 1, P({classes[1]}) (sigmoid of the "
                  f"logit); above 0.5 means {classes[1]}, else {classes[0]}")
    else:
        output = f"{OUTPUT}: float32 N x {count}, softmax over classes"
    info = {"model": spec.name, "classes": [str(c) for c in classes],
            "input_size": size, "in_channels": channels,
            "input": f"{INPUT}: float32 N x {channels} x {size} x {size}, RGB, "
                     "values in [0, 1]",
            "output": output}
    base = meta.get("base_size")
    if isinstance(base, int) and base > 0:  # how runner itself feeds the model
        info["preprocess"] = (f"resize the whole image to {base} x {base}, then "
                              f"to {size} x {size} (bilinear), divide by 255")
    return info


def _module(spec: ModelSpec, state: dict) -> Probabilities:
    model = build_model(spec)
    model.load_state_dict(state)
    # inference only: outputs need no torch.no_grad() to become numpy arrays
    return Probabilities(model, spec.num_outputs == 1).eval().requires_grad_(False)


def _images(spec: ModelSpec, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(n)
    return torch.rand(n, spec.in_channels, spec.input_size, spec.input_size,
                      generator=g)


def _check(name: str, module: nn.Module, x: torch.Tensor, got) -> None:
    """The exported file must give the eager model's probabilities."""
    with torch.no_grad():
        want = module(x)
    diff = float((torch.as_tensor(got) - want).abs().max())
    if tuple(got.shape) != tuple(want.shape) or diff > TOLERANCE:
        raise RuntimeError(f"{name} export differs from the model: shape "
                           f"{tuple(got.shape)} vs {tuple(want.shape)}, max diff {diff}")


def _out_path(path) -> Path:
    """``path`` as a local file that may be written; checked before exporting."""
    if "://" in os.fspath(path):
        raise RunnerError(f"--out {path}: must be a local file path")
    path = Path(path)
    if path.is_dir():
        raise RunnerError(f"--out {path}: is a folder; name a file")
    if path.name in FILES and (path.parent / "spec.json").is_file():
        raise RunnerError(f"--out {path}: would overwrite a checkpoint file")
    return path


def _write_atomic(path: Path, data: bytes) -> Path:
    """Write ``data`` to a temporary sibling, then rename it to ``path``."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as err:
        where = f" ({err.filename})" if err.filename else ""
        raise RunnerError(f"cannot write {path}: {err.strerror or err}{where}") from err
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


@contextmanager
def _quiet(names):
    """Hold these loggers at WARNING: their INFO lines narrate each graph pass."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_torchscript(spec: ModelSpec, state: dict, meta: dict, path) -> Path:
    """A traced TorchScript module with ``runner.json`` as an extra file."""
    path = _out_path(path)
    module = _module(spec, state)
    with warnings.catch_warnings():
        # torch marks torch.jit deprecated; TorchScript is what was asked for
        warnings.filterwarnings("ignore", category=FutureWarning,
                                message=".*torch.jit")
        traced = torch.jit.trace(module, _images(spec, TRACE_BATCH))
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer,
                       _extra_files={METADATA: json.dumps(describe(spec, meta))})
        loaded = torch.jit.load(io.BytesIO(buffer.getvalue()))
    x = _images(spec, CHECK_BATCH)
    with torch.no_grad():
        _check("TorchScript", module, x, loaded(x))
    return _write_atomic(path, buffer.getvalue())


def export_onnx(spec: ModelSpec, state: dict, meta: dict, path) -> Path:
    """An ONNX model (dynamic batch) with :func:`describe` in metadata_props."""
    path = _out_path(path)
    missing = [p for p in ONNX_PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        raise RunnerError(f"ONNX export needs {', '.join(missing)}: run "
                          "`.venv/bin/pip install -e '.[onnx]'` in the project")
    import onnx
    import onnxruntime

    module = _module(spec, state)
    with _quiet(ONNX_LOGGERS):
        program = torch.onnx.export(
            module, (_images(spec, TRACE_BATCH),), dynamo=True, verbose=False,
            input_names=[INPUT], output_names=[OUTPUT],
            dynamic_shapes={INPUT: {0: torch.export.Dim("batch")}})
    proto = program.model_proto
    onnx.helper.set_model_props(proto, {
        k: v if isinstance(v, str) else json.dumps(v)
        for k, v in describe(spec, meta).items()})
    data = proto.SerializeToString()
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    x = _images(spec, CHECK_BATCH)
    _check("ONNX", module, x, torch.from_numpy(
        session.run([OUTPUT], {INPUT: x.numpy()})[0]))
    return _write_atomic(path, data)


# format -> (exporter, default output file, in the current folder)
FORMATS = {"torchscript": (export_torchscript, "model.ts"),
           "onnx": (export_onnx, "model.onnx")}


def exporter(fmt: str):
    """(export function, default file name) of a format name."""
    if fmt not in FORMATS:
        raise RunnerError(f"unknown --format {fmt!r}; known: {', '.join(FORMATS)}")
    return FORMATS[fmt]

"""Save and load model weights safely.

A checkpoint is a local folder of three files: ``model.pt`` (a dict of plain
CPU tensors, nothing else), ``spec.json`` and ``meta.json`` (the caller's
metadata plus the sha256 of ``model.pt``). Loading checks the hash first, then
unpickles with ``weights_only=True``, so a checkpoint cannot run code: a
pickle that asks for anything but tensors is refused
(https://pytorch.org/docs/stable/generated/torch.load.html).

A training run keeps one checkpoint per epoch (``.../epoch-NNN``);
:func:`load_newest_intact` resumes from the newest one that passes these
checks, warning by name about every newer one it had to pass over (a node
that died while writing, a truncated upload).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import tempfile
import warnings
from pathlib import Path

import pyarrow.fs as pafs
import torch

from runner import storage
from runner.errors import RunnerError
from runner.model.growth import check_compatible
from runner.model.spec import ModelSpec

log = logging.getLogger(__name__)

FILES = ("model.pt", "spec.json", "meta.json")
# DistributedDataParallel wraps as `module.`, torch.compile as `_orig_mod.`
PREFIXES = ("module.", "_orig_mod.")
PICKLE_PROTOCOL_WARNING = r"Detected pickle protocol \d+ in the checkpoint"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_atomic(path: Path, write) -> None:
    """Write to a temporary sibling, then rename: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_json(path: Path, data: dict) -> None:
    try:
        text = json.dumps(data, indent=2, sort_keys=True)
    except (TypeError, ValueError) as err:
        raise RunnerError(f"cannot write {path}: not JSON ({err})") from err
    _write_atomic(path, lambda p: p.write_text(text + "\n", encoding="utf-8"))


def _plain_tensors(state_dict: dict) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies; anything else in the dict is refused."""
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise RunnerError(f"state dict entries are not tensors: {', '.join(bad)}")
    # contiguous() also turns channels_last weights back into the plain layout
    return {str(k): v.detach().cpu().contiguous().clone()
            for k, v in state_dict.items()}


def save_checkpoint(directory, spec: ModelSpec, state_dict: dict, meta: dict) -> Path:
    """Write model.pt, spec.json and meta.json (with model.pt's sha256)."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = _plain_tensors(state_dict)
    _write_atomic(folder / "model.pt", lambda p: torch.save(tensors, p))
    _write_json(folder / "spec.json", spec.to_dict())
    digest = _sha256(folder / "model.pt")
    _write_json(folder / "meta.json", {**meta, "sha256": digest})
    return folder


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise RunnerError(f"cannot read {path}: {err}") from err
    if not isinstance(data, dict):
        raise RunnerError(f"{path} must hold a JSON object")
    return data


def _load_tensors(path: Path) -> dict:
    """weights_only unpickling; anything that is not a dict of tensors is refused."""
    try:
        with warnings.catch_warnings():
            # torch warns that a file pickled with a protocol other than 2
            # "might not" load with weights_only; the load stays safe and a
            # file it cannot read is refused by name, so that is only noise.
            warnings.filterwarnings("ignore", PICKLE_PROTOCOL_WARNING, UserWarning)
            data = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # unpickling raises many types; all mean "unsafe"
        raise RunnerError(_refusal(path, err)) from err
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()
    ):
        raise RunnerError(f"refused to load {path}: expected a dict of named tensors")
    return data


def _refusal(path: Path, err: Exception) -> str:
    """Why ``path`` was not loaded, in one line. torch's own message advises
    loading with weights_only=False, which would let the file run code, so it
    is never passed on; only the object the pickle asked for is named."""
    if isinstance(err, pickle.UnpicklingError):
        wanted = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        held = (f"pickled Python objects (it asks for {wanted.group(1)})" if wanted
                else "pickled data")
        return (f"refused to load {path}: the file holds {held}, not plain "
                "tensors; such a file can run code when it is loaded, so it is "
                "refused for safety")
    lines = str(err).strip().splitlines()
    reason = lines[0] if lines and "weights_only" not in lines[0] else \
        type(err).__name__
    return f"refused to load {path}: not a file of plain tensors ({reason})"


def normalise_keys(state_dict: dict) -> dict:
    """Strip DDP (``module.``) and torch.compile (``_orig_mod.``) prefixes."""
    out = {}
    for key, value in state_dict.items():
        name = key
        while name.startswith(PREFIXES):
            name = name.split(".", 1)[1]
        if name in out:
            raise RunnerError(f"two tensors map to {name!r} without prefixes")
        out[name] = value
    return out


def load_checkpoint(directory) -> tuple[ModelSpec, dict, dict]:
    """Read a checkpoint folder back: (spec, state_dict, meta), all verified."""
    folder = Path(directory)
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        raise RunnerError(f"checkpoint {folder} is missing {', '.join(missing)}")
    meta = _read_json(folder / "meta.json")
    model_path = folder / "model.pt"
    expected = meta.get("sha256")
    if not isinstance(expected, str):
        raise RunnerError(f"{folder / 'meta.json'} has no sha256 for {model_path}")
    if _sha256(model_path) != expected:
        raise RunnerError(f"{model_path} is corrupt or truncated: sha256 differs "
                          "from meta.json")
    try:
        spec = ModelSpec.from_dict(_read_json(folder / "spec.json"))
    except RunnerError as err:
        raise RunnerError(f"{folder / 'spec.json'}: {err}") from err
    state_dict = normalise_keys(_load_tensors(model_path))
    try:
        check_compatible(spec, state_dict)
    except RunnerError as err:
        raise RunnerError(f"checkpoint {folder}: {err}") from err
    return spec, state_dict, meta


def epoch_checkpoints(newest: storage.Location) -> list[storage.Location]:
    """``newest`` and the ``epoch-NNN`` folders beside it that sort before it,
    newest first."""
    parent, name = newest.path.rsplit("/", 1)
    infos = newest.fs.get_file_info(pafs.FileSelector(parent))
    earlier = sorted((i.base_name for i in infos if i.type == pafs.FileType.Directory
                      and i.base_name.startswith("epoch-") and i.base_name < name),
                     reverse=True)
    base = storage.Location(newest.fs, parent, newest.uri.rsplit("/", 1)[0])
    return [newest] + [base.join(n) for n in earlier]


def load_newest_intact(newest: storage.Location):
    """Load ``newest``, or if it is damaged the latest intact checkpoint before
    it. Returns (spec, state_dict, meta, the Location loaded)."""
    for loc in epoch_checkpoints(newest):
        with tempfile.TemporaryDirectory() as tmp:
            try:
                return (*load_checkpoint(storage.download_dir(loc, tmp)), loc)
            except (RunnerError, OSError) as err:
                log.warning("checkpoint %s is unusable, trying the one before it: "
                            "%s", loc.uri, err)
    raise RunnerError(f"no intact checkpoint in {newest.uri} or before it")

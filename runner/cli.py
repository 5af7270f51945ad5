"""``runner``: ingest, grow, report, evaluate, predict, transfer, export, import-keras.

Errors the user can fix print as one line (``runner: error: ...``) and exit
with status 2; anything else is a bug and keeps its traceback. ``predict``
classifies every image it can read and names each one it cannot on a
``runner: skipped ...`` line; it then exits 1, as ``doctor`` does when a
check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import re
import sys
import tempfile

from runner.errors import RunnerError

log = logging.getLogger(__name__)

EXAMPLES = {
    "ingest": "runner ingest ../shared/datasets/cats_dogs runs/data",
    "grow": "runner grow jobs/cats_dogs.yaml --set storage=runs/try1",
    "doctor": "runner doctor jobs/cats_dogs.yaml",
    "report": "runner report runs/cats_dogs",
    "dashboard": "runner dashboard runs/cats_dogs --port 8266",
    "evaluate": "runner evaluate runs/cats_dogs --data ../shared/datasets/cats_dogs",
    "predict": "runner predict runs/cats_dogs/widen/train/TRIAL/epoch-003 cat.jpg",
    "transfer": "runner transfer --from CKPT --op plain_copy --to classifier_2 "
                "--out runs/copied",
    "import-keras": "runner import-keras classifier_1.weights.h5 --spec classifier_1 "
                    "--out runs/imported",
    "export": "runner export runs/cats_dogs --format onnx --out cats_dogs.onnx",
}
LINEAGE = "lineage.json"  # the same name runner.growth.loop writes
DEFAULT_BASE_SIZE = 72  # px, ingest's default, for checkpoints that do not say
DEFAULT_VAL_FRACTION = 0.1  # the job default, for checkpoints outside a run
RUN_DEPTH = 8  # folders to climb from a checkpoint looking for its run
DRIFT_IMAGES = 256  # as many as a stage measures drift on


def _process_defaults() -> None:
    """Settings Ray reads when it is imported, so set before any command runs.

    - Every address of a Ray we start ourselves stays on 127.0.0.1.
    - Ctrl-C stops a run at once (KeyboardInterrupt), as SIGKILL would: the
      rerun resumes it. Tune's own handler would instead end the stage early
      and return its results as if the stage had finished.
    """
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")


def cmd_ingest(args) -> None:
    from runner.data.ingest import ingest
    # ingest logs what it did, with the counts, in one line
    ingest(args.data, args.out, base_size=args.base_size, force=args.force)


def cmd_grow(args) -> None:
    from runner import cluster
    from runner.config import load_job
    from runner.growth.loop import grow
    job = load_job(args.job, args.set)
    if args.address:
        job.ray.address = args.address
    # A dead address is found out before anything is ingested or written
    # (grow's own checks come before that too, see growth.loop.prepare).
    cluster.check_address(job, "--address" if args.address else
                          f"ray.address in {args.job}")
    with _no_empty_folder_left(job.storage):
        grow(job)


@contextlib.contextmanager
def _no_empty_folder_left(path: str):
    """A refused command leaves no empty folder of its own making behind:
    the folders of local ``path`` that did not exist before it are removed
    again if it fails with nothing in them (folders only, never a file)."""
    from runner import storage
    loc = storage.resolve(path)
    made = None
    if loc.is_local:
        probe = loc.path
        while not os.path.lexists(probe):
            made, probe = probe, os.path.dirname(probe)
    try:
        yield
    except RunnerError:
        if made:
            _remove_empty_folders(made)
        raise


def _remove_empty_folders(top: str) -> None:
    """Remove ``top`` and the folders under it, deepest first, while empty."""
    for folder, _, _ in os.walk(top, topdown=False):
        try:
            os.rmdir(folder)
        except OSError:  # not empty: something was written there, keep it
            pass


def cmd_doctor(args) -> int:
    from runner.doctor import run
    # doctor prints one line per check; progress logs would only interleave
    logging.getLogger().setLevel(logging.WARNING)
    return run(args.job, args.set, args.address)


def cmd_report(args) -> None:
    from runner.report import report
    _check_run_folder(args.run)
    if args.html:
        _check_html_file(args.html)
    print(report(args.run))
    if args.html is not None:
        from runner.report_html import write_html
        print(f"wrote {write_html(args.run, args.html or None)}")


def cmd_dashboard(args) -> None:
    from runner.dashboard import serve
    serve(args.run, args.host, args.port)


# --- folders the user names ------------------------------------------------------


def _kind(loc):
    """"file", "folder" or None (nothing there) for a Location."""
    from pyarrow import fs as pafs

    from runner import storage
    info = storage.retry("look up", loc, lambda: loc.fs.get_file_info(loc.path))
    return {pafs.FileType.File: "file",
            pafs.FileType.Directory: "folder"}.get(info.type)


def _check_run_folder(path: str) -> None:
    """A run is a folder (its storage root); a file there is named as such."""
    from runner import storage
    if _kind(storage.resolve(path)) == "file":
        raise RunnerError(f"{path}: is a file, not a run folder; pass the run's "
                          f"storage root (the folder that holds {LINEAGE})")


def _check_html_file(path: str) -> None:
    """``--html FILE`` names a file to write (an old one is replaced): not a
    folder, nor a path under a file."""
    from runner import storage
    out = storage.resolve(path)
    if _kind(out) == "folder":
        raise RunnerError(f"--html {path}: is a folder; name the page's file, e.g. "
                          f"{path.rstrip('/')}/report.html")
    blocker = _file_in_the_way(out)
    if blocker not in (None, out.uri):
        raise RunnerError(f"--html {path}: {blocker} is a file, not a folder; "
                          "name a file in a folder")


def _new_checkpoint_folder(path: str):
    """``--out`` as a Location to write a new checkpoint into: a folder that
    holds no checkpoint yet, or nothing. A file there (or in its way) is
    refused before anything is written, so it stays as it was."""
    from runner import storage
    out = storage.resolve(path)
    blocker = _file_in_the_way(out)
    if blocker is not None:
        what = "is a file" if blocker == out.uri else f"{blocker} is a file"
        raise RunnerError(f"--out {path}: {what}, not a folder; name a new folder "
                          "for the checkpoint")
    if storage.exists(out.join("model.pt")):
        raise RunnerError(f"--out {path} already holds a checkpoint; choose "
                          "another folder")
    return out


def _file_in_the_way(out) -> str | None:
    """``out`` itself if it is a file, or (local paths) the first existing
    folder above it that is a file; None when a folder can be made there."""
    if _kind(out) == "file":
        return out.uri
    if not out.is_local:  # object stores have no folders to be in the way
        return None
    path = os.path.dirname(out.path)
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    return None if os.path.isdir(path) else path


# --- checkpoints, the runs they lie in, and data for them ----------------------


def _is_checkpoint(loc) -> bool:
    from runner import storage
    return all(storage.exists(loc.join(n)) for n in ("model.pt", "spec.json"))


def _target(path: str):
    """(checkpoint URI, lineage or None, run root or None) for a run root or a
    checkpoint folder; a run gives its last stage's winner."""
    from runner import storage
    loc = storage.resolve(path)
    if not storage.exists(loc):
        raise RunnerError(f"{path}: no such run or checkpoint folder")
    if storage.exists(loc.join(LINEAGE)):
        lineage = storage.read_json(loc.join(LINEAGE))
        stages = lineage.get("stages") or [{}]
        if not stages[-1].get("checkpoint"):
            raise RunnerError(f"{loc.uri}/{LINEAGE}: no stage has finished with a "
                              "checkpoint yet, so the run has no winner to use")
        return _in_run(stages[-1]["checkpoint"], lineage, loc), lineage, loc
    if not _is_checkpoint(loc):
        raise RunnerError(f"{path}: neither a run (no {LINEAGE}) nor a checkpoint "
                          "folder (needs model.pt and spec.json)")
    return loc.uri, _run_lineage(loc), None


def _in_run(checkpoint: str, lineage: dict, loc) -> str:
    """A checkpoint the lineage names, re-rooted at the run folder as given:
    the lineage names its checkpoints under the root it was written in, which
    a copied or moved run folder no longer is."""
    from runner.report import rerooted
    return rerooted(checkpoint, lineage.get("storage"), loc.uri)


def _run_lineage(loc) -> dict | None:
    """The lineage of the run a checkpoint lies under, if it lies under one."""
    from runner import storage
    path, uri = loc.path.rstrip("/"), loc.uri.rstrip("/")
    for _ in range(RUN_DEPTH):
        if "/" not in path.strip("/"):
            return None
        path, uri = path.rsplit("/", 1)[0], uri.rsplit("/", 1)[0]
        probe = storage.Location(loc.fs, f"{path}/{LINEAGE}", f"{uri}/{LINEAGE}")
        if storage.exists(probe):
            return storage.read_json(probe)
    return None


def _load(checkpoint: str):
    """(spec, state_dict, meta) of a checkpoint folder, local or remote, the
    weights checked to load into the spec's model; errors name the folder as
    the user gave it, not the temporary copy of a remote one."""
    from runner import storage
    from runner.evaluate import load_model
    from runner.model.checkpoint import load_checkpoint
    loc = storage.resolve(checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        local = storage.download_dir(loc, tmp)
        try:
            spec, state, meta = load_checkpoint(local)
        except RunnerError as err:
            text = str(err).replace(local, loc.uri)
            if loc.uri not in text:
                text = f"checkpoint {loc.uri}: {text}"
            raise RunnerError(text) from err
    load_model(spec, state, loc.uri)
    return spec, state, meta


def _run_data(lineage: dict | None) -> dict:
    return (lineage or {}).get("data") or {}


def _base_size(meta: dict, lineage: dict | None) -> int:
    return meta.get("base_size") or _run_data(lineage).get("base_size") \
        or DEFAULT_BASE_SIZE


def _val_fraction(lineage: dict | None) -> float:
    data = ((lineage or {}).get("job") or {}).get("data") or {}
    return data.get("val_fraction", DEFAULT_VAL_FRACTION)


def _known_classes(meta: dict, lineage: dict | None) -> list[str] | None:
    # Training checkpoints do not record class names; their run's lineage does.
    for names in (meta.get("classes"), _run_data(lineage).get("classes")):
        if isinstance(names, list) and names:
            return [str(n) for n in names]
    return None


def _class_names(spec, meta: dict, lineage: dict | None) -> list[str]:
    """Names from the checkpoint, else from its run, else "class k"."""
    count = max(2, spec.num_outputs)
    names = _known_classes(meta, lineage)
    if names and len(names) == count:
        return names
    return [f"class {k}" for k in range(count)]


def _default_cache(data: str) -> str:
    # One cache folder per data folder, so a second evaluation reuses shards.
    key = hashlib.sha256(os.path.realpath(data).encode()).hexdigest()[:12]
    return os.path.join(tempfile.gettempdir(), "runner-eval-data", key)


def _data_manifest(data: str, cache: str, base_size: int,
                   lineage: dict | None = None) -> dict:
    """Shards for ``data``: a shards folder as it is (only read), an image
    folder ingested into ``cache`` (reused while unchanged), never into the
    shards of the run ``lineage`` describes. Has ``location`` like a run's."""
    from runner import storage
    from runner.data.ingest import MANIFEST, ingest, load_manifest, summary
    loc = storage.resolve(data)
    if storage.exists(loc.join(MANIFEST)):
        return dict(load_manifest(loc), location=loc.uri)
    _check_cache(cache, lineage)
    manifest = ingest(data, cache, base_size=base_size)
    log.info("data %s: %s", data, summary(manifest))
    return dict(manifest, location=storage.resolve(cache).uri)


def _check_cache(cache: str, lineage: dict | None) -> None:
    """Ingesting another folder into the run's own shards folder would
    replace the shards the run trained on (and resumes from)."""
    from runner import storage
    root = (lineage or {}).get("storage")
    own = _run_data(lineage).get("location") or (root and f"{root}/data")
    if own and storage.resolve(cache).uri.rstrip("/") == own.rstrip("/"):
        raise RunnerError(f"--cache {cache} is the run's own data folder; "
                          "choose another folder for the scored images' shards")


def _check_classes(spec, meta: dict, lineage, manifest: dict) -> None:
    classes = manifest["classes"]
    if spec.num_outputs != 1 or len(classes) != 2:
        raise RunnerError(f"{spec.name} has {spec.num_outputs} output(s); only a "
                          f"binary model on two classes can be scored, and the "
                          f"data has {len(classes)}: {', '.join(classes)}")
    known = _known_classes(meta, lineage)
    if known and known != list(classes):
        raise RunnerError(f"the model was trained on classes {known}, the data has "
                          f"{classes}: name the class folders the same")


# --- evaluate ------------------------------------------------------------------


def cmd_evaluate(args) -> None:
    from runner.evaluate import evaluate_checkpoint
    checkpoint, lineage, run = _target(args.target)
    spec, _, meta = _load(checkpoint)
    cache = args.cache or (run.join("eval-data").uri if run else
                           _default_cache(args.data))
    manifest = _data_manifest(args.data, cache, _base_size(meta, lineage), lineage)
    _check_classes(spec, meta, lineage, manifest)
    scores = evaluate_checkpoint(checkpoint, manifest, args.split, spec.input_size,
                                 _val_fraction(lineage))
    result = {"checkpoint": checkpoint, "model": spec.name, "split": args.split,
              **scores}
    print(json.dumps(result, indent=2) if args.json else format_scores(result))


def format_scores(result: dict) -> str:
    """Accuracy, per-class accuracy and the confusion matrix as small tables."""
    classes = result["classes"]
    width = max(8, *(len(c) + 2 for c in classes))
    lines = [f"{result['model']} on {result['split']} "
             f"({result['images']} images): {result['checkpoint']}",
             f"accuracy {result['accuracy']:.4f}", "",
             f"{'class':<{width}}{'images':>8}{'accuracy':>10}"]
    for i, name in enumerate(classes):
        images = sum(result["confusion"][i])
        lines.append(f"{name:<{width}}{images:>8}{result['per_class'][name]:>10.4f}")
    lines += ["", "confusion (rows: true class, columns: predicted)",
              f"{'':<{width}}" + "".join(f"{c:>{width}}" for c in classes)]
    for name, row in zip(classes, result["confusion"]):
        lines.append(f"{name:<{width}}" + "".join(f"{n:>{width}}" for n in row))
    return "\n".join(lines)


# --- predict -------------------------------------------------------------------


def cmd_predict(args) -> int:
    from runner.evaluate import load_model
    checkpoint, lineage, _ = _target(args.checkpoint)
    spec, state, meta = _load(checkpoint)
    model = load_model(spec, state, checkpoint)
    names = _class_names(spec, meta, lineage)
    base = _base_size(meta, lineage)
    failed = 0
    for path in args.images:
        images = _files_in(path) if os.path.isdir(path) else [path]
        if not images:
            print(f"runner: skipped {path}: no files directly in this folder "
                  "(sub-folders are not read)",
                  file=sys.stderr)
            failed += 1
        for image in images:
            # one bad file must not hide the answers for the others
            failed += not _predict_one(model, spec.input_size, base, names, image)
    return 1 if failed else 0


def _files_in(folder: str) -> list[str]:
    """The files directly in ``folder``, sorted; hidden names (``.DS_Store``,
    ``Thumbs.db``) left out and sub-folders not entered, as ingest does."""
    from runner.data.ingest import HIDDEN_NAMES
    paths = [os.path.join(folder, name) for name in sorted(os.listdir(folder))
             if not name.startswith(".") and name.lower() not in HIDDEN_NAMES]
    return [p for p in paths if not os.path.isdir(p)]


def _predict_one(model, image_size: int, base: int, names: list, path: str) -> bool:
    """Print "path, class, probability", or why the file cannot be read."""
    import numpy as np

    from runner.data.ingest import decode_image
    from runner.data.pipeline import eval_view
    outcome = decode_image(path, base)
    if outcome.image is None:
        detail = re.sub(r" at 0x[0-9a-f]+", "", str(outcome.detail))
        print(f"runner: skipped {path}: cannot decode: {outcome.reason} "
              f"({detail})", file=sys.stderr)
        return False
    # bytearray: a writable buffer, which torch.from_numpy wants
    pixels = np.frombuffer(bytearray(outcome.image), np.uint8)
    label, prob = _classify(model, eval_view(pixels.reshape(1, base, base, 3),
                                             image_size))
    print(f"{path}\t{names[label]}\t{prob:.4f}")
    return True


def _classify(model, x) -> tuple[int, float]:
    """(class index, its probability) of one image; one logit means binary, with
    the same 0.5 threshold as evaluation."""
    import torch
    with torch.no_grad():
        logits = model(x)[0]
    if logits.numel() == 1:
        p = float(torch.sigmoid(logits[0]))
        return (1, p) if p > 0.5 else (0, 1.0 - p)
    probs = torch.softmax(logits, dim=0)
    k = int(probs.argmax())
    return k, float(probs[k])


# --- transfer ------------------------------------------------------------------


def cmd_transfer(args) -> None:
    from runner import storage
    source = storage.resolve(args.source)
    if not (storage.exists(source) and _is_checkpoint(source)):
        raise RunnerError(f"--from {args.source}: not a checkpoint folder (needs "
                          "model.pt and spec.json)")
    out = _new_checkpoint_folder(args.out)
    spec, state, meta = _load(source.uri)
    child, child_state, report = _transfer(spec, state, args)
    lineage = _run_lineage(source)
    if args.data:
        _measure(args, (spec, state), (child, child_state), report,
                 _base_size(meta, lineage), lineage)
    # carry what predict and evaluate need, so the child reads on its own
    carried = {"base_size": _base_size(meta, lineage)}
    if _known_classes(meta, lineage):
        carried["classes"] = _known_classes(meta, lineage)
    _save(out, child, child_state, {"epoch": 0, "parent": source.uri,
                                    "transfer": report.to_dict(), **carried})
    print(report.format())
    print(f"wrote {out.uri}")


def _transfer(spec, state, args):
    """Run ``--op``: a growth op by name, or a transfer kind towards ``--to``."""
    from runner.model.growth import OPS, TRANSFER_KINDS, apply_op, transfer_to
    from runner.model.spec import get_spec
    known = list(dict.fromkeys([*OPS, *TRANSFER_KINDS]))
    if args.op not in known:
        raise RunnerError(f"unknown --op {args.op!r}; known: {', '.join(known)}")
    params = _params(args.param)
    target = get_spec(args.to) if args.to else None
    if args.op not in OPS:  # function_preserving: a plan of ops, not one op
        if params or target is None:
            raise RunnerError(f"--op {args.op} takes --to SPEC and no --param")
        return transfer_to(spec, state, target, args.op, rng=args.seed)
    return apply_op(spec, state, args.op, **_op_params(args, params, target))


def _op_params(args, params: dict, target) -> dict:
    import inspect

    from runner.model.growth import OPS
    takes = inspect.signature(OPS[args.op]).parameters
    if "target_spec" in takes and target is None:
        raise RunnerError(f"--op {args.op} needs --to SPEC (e.g. classifier_2)")
    if target is not None:
        if "target_spec" not in takes:
            raise RunnerError(f"--op {args.op} takes no --to; use --param "
                              "to set its parameters")
        params["target_spec"] = target
    if args.seed is not None:
        params["rng"] = args.seed
    return params


def _params(pairs: list[str]) -> dict:
    """--param k=v pairs; values are read as YAML, so 64 is an int, 0.1 a float."""
    import yaml
    params = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise RunnerError(f"--param {pair!r}: expected key=value, e.g. filters=64")
        # the op itself checks each value (runner.model.growth)
        params[key.strip()] = yaml.safe_load(text)
    return params


def _measure(args, parent, child, report, base_size: int,
             lineage: dict | None) -> None:
    """Fill ``report`` with logit drift on up to DRIFT_IMAGES images of --data:
    validation rows, or test rows when the folder is too small to have any."""
    import torch

    from runner.data.pipeline import eval_view
    from runner.evaluate import load_split
    from runner.model.growth import measure_drift
    size, child_size = parent[0].input_size, child[0].input_size
    if size != child_size:
        raise RunnerError(f"drift needs one input size; the parent sees {size}px, "
                          f"the child {child_size}px")
    cache = args.cache or _default_cache(args.data)
    manifest = _data_manifest(args.data, cache, base_size, lineage)
    pixels, labels = load_split(manifest, "val", DEFAULT_VAL_FRACTION)
    if not len(labels):
        pixels, labels = load_split(manifest, "test")
    images = eval_view(pixels[:DRIFT_IMAGES], size)
    labels = torch.from_numpy(labels[:DRIFT_IMAGES]).float()
    measure_drift(*parent, *child, images, labels, report)


def _save(out, spec, state, meta: dict) -> None:
    from runner import storage
    from runner.model.checkpoint import save_checkpoint
    try:
        if out.is_local:
            save_checkpoint(out.path, spec, state, meta)
            return
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(tmp, spec, state, meta)
            storage.upload_dir(tmp, out)
    except OSError as err:  # no permission, disk full, a file in the way
        raise RunnerError(f"--out {out.uri}: cannot write the checkpoint "
                          f"({err.strerror or err})") from err


# --- export --------------------------------------------------------------------


def cmd_export(args) -> None:
    from runner.export import exporter
    export, default = exporter(args.format)
    checkpoint, lineage, _ = _target(args.checkpoint)
    spec, state, meta = _load(checkpoint)
    # these travel in the file; a run's lineage knows them when meta does not
    meta = {**meta, "classes": _class_names(spec, meta, lineage),
            "base_size": _base_size(meta, lineage)}
    print(f"wrote {export(spec, state, meta, args.out or default)}")


# --- import-keras ----------------------------------------------------------------


def cmd_import_keras(args) -> None:
    from runner.keras_import import import_keras, parse_classes
    from runner.model.spec import get_spec
    spec = get_spec(args.spec)
    classes = parse_classes(args.classes, spec)
    out = _new_checkpoint_folder(args.out)
    state, meta = import_keras(args.weights, spec, classes, DEFAULT_BASE_SIZE)
    _save(out, spec, state, meta)
    source = meta["source"]
    pairs = ", ".join(f"{k} <- {v}" for k, v in source["layers"].items())
    print(f"{args.weights} ({source['layout']}) as {spec.name}: {pairs}")
    print(f"wrote {out.uri}")


# --- the parser ------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="runner", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    def add(name, func, help):
        s = sub.add_parser(name, help=help, description=help,
                           epilog=f"example: {EXAMPLES[name]}")
        s.set_defaults(func=func)
        return s

    s = add("ingest", cmd_ingest, "decode an image folder into Parquet shards")
    s.add_argument("data", help="folder with training_set/ and test_set/")
    s.add_argument("out", help="shards folder or URI")
    s.add_argument("--base-size", type=int, default=72, help="stored size, px")
    s.add_argument("--force", action="store_true", help="ingest even if unchanged")

    s = add("grow", cmd_grow, "run a growth job (all stages) from a YAML job file")
    s.add_argument("job", help="job file, e.g. jobs/cats_dogs.yaml")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set stages.0.epochs=1")
    s.add_argument("--address", help="Ray address ('auto' = a local ray start)")

    s = add("doctor", cmd_doctor, "check the setup a run needs (versions, Ray, "
            "storage, data, CPU plan), one line each; exit 1 if any check fails")
    s.add_argument("job", nargs="?", help="job file to check (without one, only "
                   "the machine and Ray are checked)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, as for grow")
    s.add_argument("--address", help="Ray address to check instead of the job's")

    s = add("report", cmd_report, "print a run's stages, trials, winners and compute")
    s.add_argument("run", help="the run's storage root")
    s.add_argument("--html", nargs="?", const="", metavar="FILE",
                   help="also write a self-contained page (default RUN/report.html)")

    s = add("dashboard", cmd_dashboard, "follow a run live on a local web page")
    s.add_argument("run", help="the run's storage root (folder or URI)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on "
                   "(default 127.0.0.1; the page has no authentication)")
    s.add_argument("--port", type=int, default=8266,
                   help="port (default 8266; 0 picks a free one)")

    _add_evaluate(add("evaluate", cmd_evaluate,
                      "score a run's winner or a checkpoint on an image folder"))
    _add_predict(add("predict", cmd_predict,
                     "classify image files with a checkpoint, one line each"))
    _add_transfer(add("transfer", cmd_transfer,
                      "grow or copy a checkpoint into a new one, with its report"))
    _add_import_keras(add("import-keras", cmd_import_keras,
                          "turn a Keras model's .h5 weights into a checkpoint of "
                          "the same architecture"))
    _add_export(add("export", cmd_export,
                    "write a checkpoint as one TorchScript or ONNX file that "
                    "outputs probabilities and runs without runner"))
    return p


def _add_evaluate(s) -> None:
    s.add_argument("target", metavar="RUN_OR_CHECKPOINT",
                   help="a run's storage root (its last winner) or a checkpoint folder")
    s.add_argument("--data", required=True, metavar="FOLDER",
                   help="image folder with training_set/ and test_set/, or shards")
    s.add_argument("--split", choices=("test", "train", "val"), default="test",
                   help="which images to score (default: test)")
    s.add_argument("--cache", metavar="DIR", help="where decoded shards are kept "
                   "(default: RUN/eval-data, or a folder under the temp dir)")
    s.add_argument("--json", action="store_true", help="print the scores as JSON")


def _add_predict(s) -> None:
    s.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="checkpoint folder (or a run root: its last winner)")
    s.add_argument("images", metavar="IMAGE", nargs="+", help="image files, or "
                   "folders of them (the files directly inside); exit status 1 "
                   "if any could not be read (each is named, the rest classified)")


def _add_export(s) -> None:
    s.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="checkpoint folder (or a run root: its last winner)")
    s.add_argument("--format", required=True, metavar="FORMAT",
                   help="torchscript or onnx (onnx needs the onnx extra)")
    s.add_argument("--out", metavar="FILE", help="file to write (default: "
                   "model.ts or model.onnx in the current folder)")


def _add_transfer(s) -> None:
    s.add_argument("--from", dest="source", required=True, metavar="CHECKPOINT",
                   help="the parent checkpoint folder")
    s.add_argument("--op", required=True, help="growth op (widen_conv, "
                   "widen_dense, deepen_conv, deepen_block, plain_copy, fresh) or "
                   "function_preserving")
    s.add_argument("--to", metavar="SPEC", help="target spec: a name "
                   "(classifier_2) or a spec JSON file")
    s.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="op parameter, e.g. --param block=0 --param filters=64")
    s.add_argument("--seed", type=int, help="seed for ops that draw random numbers")
    s.add_argument("--out", required=True, metavar="DIR",
                   help="folder for the new checkpoint")
    s.add_argument("--data", metavar="FOLDER_OR_SHARDS",
                   help=f"measure logit drift on up to {DRIFT_IMAGES} images of it")
    s.add_argument("--cache", metavar="DIR", help="where --data's shards are kept")


def _add_import_keras(s) -> None:
    s.add_argument("weights", metavar="WEIGHTS.h5", help="Keras weights: a Keras 3 "
                   ".weights.h5, or a Keras 2 / legacy model.save HDF5 file")
    s.add_argument("--spec", required=True, metavar="SPEC", help="the architecture "
                   "it has: a name (classifier_1) or a spec JSON file")
    s.add_argument("--out", required=True, metavar="DIR",
                   help="folder for the new checkpoint")
    s.add_argument("--classes", metavar="A,B", help="class names in label order "
                   "(default: cats,dogs)")


def main(argv: list[str] | None = None) -> int:
    _process_defaults()
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        status = args.func(args)
    except RunnerError as err:
        print(f"runner: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("runner: interrupted", file=sys.stderr)
        return 130
    return status or 0


if __name__ == "__main__":
    sys.exit(main())

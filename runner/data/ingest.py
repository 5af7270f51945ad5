"""An image folder -> Parquet shards of pre-decoded pixels + ``manifest.json``.

Every image is decoded once here, so training never touches a JPEG again.

Layout read (``data_root`` is a local folder)::

    data_root/training_set/<class>/<image>     -> split "train"
    data_root/test_set/<class>/<image>         -> split "test"

Classes are the folder names, sorted; a label is an index into that list.
Layout written (``out`` is a local path or any pyarrow URI)::

    out/manifest.json                          the commit point, written last
    out/shards-<fingerprint[:12]>-<rand>/train/part-00000.parquet ...
    out/shards-<fingerprint[:12]>-<rand>/test/part-00000.parquet ...

The manifest lists shard paths relative to ``out``. A new ingest writes into a
fresh versioned folder and only then replaces ``manifest.json`` atomically, so
at every moment the manifest names either the old complete set or the new one;
a failed or interrupted ingest leaves the old shards and manifest untouched.
Old versioned folders are deleted after the new manifest is in place, so two
ingests into the same ``out`` at once are not supported.

Rules (each skipped file is listed in the manifest with a reason and detail):

- Format is judged by content, not extension: a PNG named ``.jpg`` is kept,
  and so is anything else Pillow reads (BMP, TIFF, GIF, WebP...). Multi-frame
  files (GIF, TIFF) contribute their first frame.
- ``hidden``: names starting with ``.`` (``.DS_Store``, ``._name``),
  ``Thumbs.db``, ``desktop.ini``, ``__MACOSX``; ignored and counted.
- ``nested_dir``: a folder inside a class folder is not descended into (a
  class is exactly the files directly in its folder); reported once.
- Links: a link to a file is read like the file, wherever it points, so a
  class folder of links (``cp -s``, ``ln -s``) ingests like one of copies. A
  link to a folder inside a class folder is a ``nested_dir`` like any
  folder, so no folder is walked twice and a link loop is never followed.
  Class and split folders may themselves be links. ``broken_symlink``,
  ``not_a_file`` (fifo, socket) and ``not_in_class_folder`` (a file directly
  in training_set) are reported.
- ``empty`` (0 bytes), ``unreadable`` (permission), ``not_an_image``.
- ``too_large``: the header's size is checked against ``max_pixels`` (50 MP)
  before any pixel is decoded; Pillow's DecompressionBombError counts too.
- ``truncated``: ``ImageFile.LOAD_TRUNCATED_IMAGES`` stays False, so a file
  that ends early is skipped rather than kept with grey filler. ``corrupt``:
  any other decode failure. An image that decodes but makes Pillow warn (bad
  EXIF, odd palette) is kept; the warning goes to the manifest's ``warnings``.
  libjpeg repairs damaged scan data silently and Pillow does not report it,
  so such JPEGs are kept with whatever pixels libjpeg produced.
- Orientation: the EXIF tag is applied (``ImageOps.exif_transpose``); the
  stored ``height``/``width`` are the upright original size.
- Colour: alpha (RGBA, LA, P or L/RGB with a transparent colour) is
  composited on white, since a transparent background is almost always
  meant as paper. CMYK/YCbCr/LAB/HSV/1/L/P use Pillow's conversion (ICC
  profiles are ignored). 16-bit and 32-bit integer greyscale are scaled from
  0..65535 to 0..255 with rounding (16-bit RGB PNGs are already reduced to
  their high byte by Pillow). Float images are ``unsupported_mode``.
- Resize: straight to ``base_size`` square (the photos are already squashed
  squares, so no aspect is kept) with antialiased bilinear filtering. JPEGs
  are first decoded at the smallest DCT scale still >= ``base_size``
  (``draft``): ~1.8x faster here, pixels within a few levels of a full decode.

The fingerprint is a sha256 over the format version, the content settings
(``base_size``, ``max_pixels``), every candidate file's relative path and
bytes, and the path and reason of every file skipped while scanning.
``shard_rows`` only changes how rows are cut into files and is left out.
Rows within a split are ordered by a hash of their path, so every shard holds
a mix of classes in the same order on every run.

With ``workers > 1`` decoding runs in a forkserver process pool, so a script
that calls :func:`ingest` needs the usual ``if __name__ == "__main__"`` guard.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import logging
import multiprocessing
import os
import re
import time
import uuid
import warnings
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from runner import storage
from runner.errors import RunnerError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = {"train": "training_set", "test": "test_set"}
MAX_PIXELS = 50_000_000  # ~150 MB as RGB: more than any photo, less than a bomb
HIDDEN_NAMES = frozenset({".ds_store", "thumbs.db", "desktop.ini", "__macosx"})
# Names of the photo formats Pillow decodes; only for counting without opening
# files (check_layout). Ingest itself judges every file by its content.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp",
                              ".gif", ".tif", ".tiff", ".webp"})
SHARD_PREFIX = "shards-"
PROGRESS_EVERY = 2000  # images between progress lines
CHUNK = 32  # images per task sent to a worker process: amortises pickling
SCHEMA = pa.schema([
    ("image", pa.binary()),
    ("label", pa.int64()),
    ("path", pa.string()),
    ("height", pa.int32()),
    ("width", pa.int32()),
    ("fold", pa.int32()),
])

# Kept False on purpose: a truncated file is skipped, never padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False


@dataclass(frozen=True)
class _Settings:
    base_size: int
    shard_rows: int
    workers: int
    max_pixels: int


@dataclass(frozen=True)
class _Item:
    """One candidate image: ``rel`` is its path relative to the data root."""

    split: str
    label: int
    rel: str
    path: str


@dataclass
class _Scan:
    classes: list[str]
    items: list[_Item]
    skipped: list[dict]


class _Outcome(NamedTuple):
    """What a worker sends back for one file: pixels, or a skip reason."""

    image: bytes | None = None
    height: int = 0
    width: int = 0
    reason: str | None = None
    detail: str = ""
    warnings: tuple[str, ...] = ()


@dataclass
class _Result:
    shards: dict = field(default_factory=lambda: {s: [] for s in SPLITS})
    counts: dict = field(default_factory=dict)
    skipped: list = field(default_factory=list)
    warnings: list = field(default_factory=list)


# ---------------------------------------------------------------- public API


def ingest(data_root: str, out: str | storage.Location, base_size: int = 72,
           shard_rows: int = 2000, workers: int | None = None,
           force: bool = False, max_pixels: int = MAX_PIXELS) -> dict:
    """Decode ``data_root`` into shards under ``out``; return the manifest.

    An unchanged folder (same fingerprint, all shards present) is not decoded
    again unless ``force``. The returned dict has ``reused`` set accordingly.
    """
    settings = _settings(base_size, shard_rows, workers, max_pixels)
    root = _check_root(data_root)
    out = out if isinstance(out, storage.Location) else storage.resolve(out)
    _check_out(out, root)
    scan = _scan(root)
    fingerprint = _fingerprint(scan, settings)

    previous = None if force else _reusable(out, fingerprint)
    if previous is not None:
        previous = {**previous, "reused": True}
        log.info("reusing shards in %s (fingerprint %s): %s", out.uri,
                 fingerprint[:12], summary(previous))
        return previous

    storage.check_writable(out)
    manifest = _build(root, out, scan, fingerprint, settings)
    log.info("ingest %s -> %s: %s", root, out.uri, summary(manifest))
    return manifest


def load_manifest(out: str | storage.Location) -> dict:
    """The manifest under ``out``; RunnerError if missing or incomplete."""
    out = out if isinstance(out, storage.Location) else storage.resolve(out)
    loc = out.join(MANIFEST)
    if not storage.exists(loc):
        raise RunnerError(f"{loc.uri}: no manifest; run `runner ingest` first")
    manifest = storage.read_json(loc)
    needed = {"version", "fingerprint", "base_size", "classes", "counts", "shards"}
    if not isinstance(manifest, dict) or needed - manifest.keys():
        raise RunnerError(f"{loc.uri}: incomplete manifest; run `runner ingest` again")
    missing = _missing_shards(out, manifest)
    if missing:
        raise RunnerError(f"{loc.uri}: shard {missing[0]} is missing; "
                          "run `runner ingest --force`")
    return manifest


def shard_paths(out: str | storage.Location, manifest: dict) -> dict[str, list]:
    """Filesystem paths of each split's shards, on ``storage.resolve(out).fs``."""
    out = out if isinstance(out, storage.Location) else storage.resolve(out)
    return {split: [out.join(rel).path for rel in rels]
            for split, rels in manifest["shards"].items()}


def summary(manifest: dict) -> str:
    """One line: images per split and class, skips per reason, reused or not."""
    parts = []
    for split, counts in manifest["counts"].items():
        per_class = ", ".join(f"{c} {n}" for c, n in counts.items())
        parts.append(f"{split}: {per_class}")
    reasons = collections.Counter(s["reason"] for s in manifest.get("skipped", []))
    detail = ", ".join(f"{r} {n}" for r, n in sorted(reasons.items()))
    counted = f"skipped {sum(reasons.values())}"
    parts.append(counted + (f" ({detail})" if detail else ""))
    parts.append(f"{manifest['base_size']}px")
    parts.append("reused" if manifest.get("reused") else "ingested")
    return "; ".join(parts)


def check_layout(data_root: str) -> dict:
    """The checks ingest makes before decoding, alone and cheap: ``{"root",
    "classes", "counts": {split: {class: files}}, "images": {split: {class:
    files named like images}}, "skipped"}`` from listing the folders, no image
    opened (``images`` goes by IMAGE_EXTENSIONS; ingest keeps whatever
    decodes). RunnerError naming the folder at the first problem: a missing
    split folder, class folders that differ between the splits or number
    fewer than two, a class folder with no files."""
    root = _check_root(data_root)
    scan = _scan(root)
    counts = {split: dict.fromkeys(scan.classes, 0) for split in SPLITS}
    images = {split: dict.fromkeys(scan.classes, 0) for split in SPLITS}
    for item in scan.items:
        counts[item.split][scan.classes[item.label]] += 1
        if os.path.splitext(item.rel)[1].lower() in IMAGE_EXTENSIONS:
            images[item.split][scan.classes[item.label]] += 1
    return {"root": root, "classes": scan.classes, "counts": counts,
            "images": images, "skipped": len(scan.skipped)}


# ---------------------------------------------------------- checks and scan


def _settings(base_size, shard_rows, workers, max_pixels) -> _Settings:
    checks = [("base_size", base_size, 8, 1024), ("shard_rows", shard_rows, 1, None),
              ("workers", workers, 1, 256), ("max_pixels", max_pixels, 1, None)]
    for name, value, low, high in checks:
        if value is None and name == "workers":
            continue
        bad = not isinstance(value, int) or isinstance(value, bool) or value < low
        if bad or (high is not None and value > high):
            allowed = f"{low}..{high}" if high else f">= {low}"
            raise RunnerError(f"ingest setting {name}={value!r}: must be an integer "
                              f"{allowed}")
    return _Settings(base_size, shard_rows, workers or os.cpu_count() or 1,
                     max_pixels)


def _check_root(data_root: str) -> str:
    """The data root as an absolute real path, or a RunnerError saying why not."""
    text = str(data_root)
    if "://" in text and not text.startswith("file://"):
        raise RunnerError(f"data root {text}: must be a local folder (Pillow reads "
                          "the images); copy it to this machine first")
    root = os.path.realpath(os.path.expanduser(text.removeprefix("file://")))
    if not os.path.exists(root):
        raise RunnerError(f"data root {data_root}: no such folder")
    if not os.path.isdir(root):
        raise RunnerError(f"data root {data_root}: not a folder")
    for folder in SPLITS.values():
        if not os.path.isdir(os.path.join(root, folder)):
            raise RunnerError(f"data root {data_root} has no {folder} folder (expected "
                              f"training_set/<class>/ and test_set/<class>/)"
                              f"{_root_hint(root)}")
    return root


def _root_hint(root: str) -> str:
    """Why a folder lacking the split folders may be one level off, if it is."""
    def has_splits(folder):
        return all(os.path.isdir(os.path.join(folder, f)) for f in SPLITS.values())

    for child in _subfolders(root):
        if has_splits(os.path.join(root, child)):
            return f"; it holds {child}/ which has both: pass {root}/{child} instead"
    parent = os.path.dirname(root)
    for ancestor in (parent, os.path.dirname(parent)):
        if has_splits(ancestor):
            return (f"; {root} looks like a split or class folder inside {ancestor}: "
                    f"pass {ancestor} instead")
    return ""


def _subfolders(folder: str) -> list[str]:
    return [e.name for e in _entries(folder) if e.is_dir() and not _is_hidden(e.name)]


def _entries(folder: str) -> list[os.DirEntry]:
    """A folder's entries sorted by name; an unreadable folder is named."""
    try:
        with os.scandir(folder) as entries:
            return sorted(entries, key=lambda e: e.name)
    except OSError as err:
        raise RunnerError(f"cannot list folder {folder}: {err.strerror}") from err


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name.lower() in HIDDEN_NAMES


def _check_out(out: storage.Location, root: str) -> None:
    # Shards written inside a split folder would be scanned as images next time.
    if not out.is_local:
        return
    target = os.path.realpath(out.path)
    for folder in SPLITS.values():
        if _within(target, os.path.join(root, folder)):
            raise RunnerError(f"output {out.uri} is inside the data folder "
                              f"{folder}; write shards somewhere else")


def _within(path: str, folder: str) -> bool:
    folder = os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def _scan(root: str) -> _Scan:
    """Every candidate file, in a fixed order, plus what was skipped on sight."""
    classes, skipped = _check_classes(root)
    items = []
    for split, folder in SPLITS.items():
        for label, name in enumerate(classes):
            found, skips = _scan_class(root, split, label, f"{folder}/{name}")
            if not found:
                raise RunnerError(f"class folder {os.path.join(root, folder, name)} "
                                  f"has no image files{_reasons(skips)}")
            items += found
            skipped += skips
    return _Scan(classes, items, skipped)


def _reasons(skips: list[dict]) -> str:
    """" (skipped: hidden 2, nested_dir 1)" for the entries passed over, or ""."""
    counts = collections.Counter(s["reason"] for s in skips)
    listed = ", ".join(f"{r} {n}" for r, n in sorted(counts.items()))
    return f" (skipped: {listed})" if listed else ""


def _check_classes(root: str) -> tuple[list[str], list[dict]]:
    """Class names shared by both splits; stray and hidden entries are skipped."""
    found, skipped = {}, []
    for folder in SPLITS.values():
        found[folder], skips = _split_entries(root, folder)
        skipped += skips
    train, test = found["training_set"], found["test_set"]
    if train != test:
        raise RunnerError(f"class folders differ in {root}: training_set has "
                          f"{train}, test_set has {test}")
    if len(train) < 2:
        raise RunnerError(f"{root}/training_set needs at least two class folders, "
                          f"found {train}: put each class's images in its own folder")
    return train, skipped


def _split_entries(root: str, folder: str) -> tuple[list[str], list[dict]]:
    classes, skipped = [], []
    for entry in _entries(os.path.join(root, folder)):
        rel = f"{folder}/{entry.name}"
        if _is_hidden(entry.name):
            skipped.append(_skip_record(rel, "hidden", "hidden or system file"))
        elif entry.is_dir():
            classes.append(entry.name)
        else:
            skipped.append(_skip_record(rel, "not_in_class_folder",
                                        "files must sit in a class folder"))
    return classes, skipped


def _scan_class(root: str, split: str, label: int, rel_dir: str):
    items, skipped = [], []
    for entry in _entries(os.path.join(root, rel_dir)):
        rel = f"{rel_dir}/{entry.name}"
        reason, detail = _entry_problem(entry)
        if reason:
            skipped.append(_skip_record(rel, reason, detail))
        else:
            items.append(_Item(split, label, rel, entry.path))
    return items, skipped


def _entry_problem(entry: os.DirEntry) -> tuple[str | None, str]:
    """Why a directory entry is not a candidate image, or (None, "")."""
    if _is_hidden(entry.name):
        return "hidden", "hidden or system file"
    if not _name_is_utf8(entry.name):
        return "bad_name", "file name is not valid UTF-8"
    if entry.is_symlink() and not os.path.exists(entry.path):
        return "broken_symlink", f"points to missing {os.readlink(entry.path)}"
    if entry.is_dir():
        return "nested_dir", "folders inside a class folder are not read"
    if not entry.is_file():
        return "not_a_file", "not a regular file"
    return None, ""


def _name_is_utf8(name: str) -> bool:
    # Undecodable bytes arrive as surrogates, which Parquet strings cannot hold.
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _skip_record(rel: str, reason: str, detail: str) -> dict:
    log.debug("skip %s: %s (%s)", rel, reason, detail)
    safe = rel.encode("utf-8", "backslashreplace").decode("utf-8")
    return {"path": safe, "reason": reason, "detail": detail}


def _fingerprint(scan: _Scan, settings: _Settings) -> str:
    digest = hashlib.sha256(f"runner-ingest v{FORMAT_VERSION} base_size="
                            f"{settings.base_size} max_pixels="
                            f"{settings.max_pixels}\n".encode())
    for item in sorted(scan.items, key=lambda i: i.rel):
        try:
            with open(item.path, "rb") as f:
                data = f.read()
        except OSError as err:
            data = f"unreadable: {err.strerror}".encode()
        digest.update(item.rel.encode() + b"\0" + len(data).to_bytes(8, "little"))
        digest.update(data)
    for skip in scan.skipped:
        digest.update(f"{skip['path']}\0{skip['reason']}\n".encode())
    return digest.hexdigest()


# ----------------------------------------------------------- reuse and build


def _reusable(out: storage.Location, fingerprint: str) -> dict | None:
    """The existing manifest if it matches ``fingerprint`` and is complete."""
    loc = out.join(MANIFEST)
    if not storage.exists(loc):
        return None
    try:
        manifest = storage.read_json(loc)
    except RunnerError as err:
        log.warning("ignoring unreadable manifest: %s", err)
        return None
    if manifest.get("fingerprint") != fingerprint:
        log.info("data or settings changed since the last ingest; ingesting again")
        return None
    missing = _missing_shards(out, manifest)
    if missing:
        log.warning("shard %s is missing; ingesting again", missing[0])
        return None
    return manifest


def _missing_shards(out: storage.Location, manifest: dict) -> list[str]:
    rels = [rel for split in manifest["shards"].values() for rel in split]
    infos = out.fs.get_file_info([out.join(rel).path for rel in rels])
    return [rel for rel, info in zip(rels, infos)
            if info.type != pafs.FileType.File]


def _build(root: str, out: storage.Location, scan: _Scan, fingerprint: str,
           settings: _Settings) -> dict:
    """Write a new versioned shard set, then commit it by replacing the manifest."""
    start = time.monotonic()
    version = f"{SHARD_PREFIX}{fingerprint[:12]}-{uuid.uuid4().hex[:6]}"
    try:
        result = _write_shards(scan, out, version, settings)
        _check_kept(root, scan, result)
        manifest = _manifest(root, scan, fingerprint, settings, result)
        manifest["seconds"] = round(time.monotonic() - start, 2)
        storage.write_json(out.join(MANIFEST), manifest)
    except BaseException:
        _delete_quietly(out.join(version))
        raise
    _remove_stale(out, keep=version)
    return {**manifest, "reused": False}


def _manifest(root, scan, fingerprint, settings, result) -> dict:
    return {
        "version": FORMAT_VERSION,
        "source": root,
        "fingerprint": fingerprint,
        "base_size": settings.base_size,
        "max_pixels": settings.max_pixels,
        "classes": scan.classes,
        "counts": result.counts,
        "skipped": sorted(scan.skipped + result.skipped, key=lambda s: s["path"]),
        "warnings": result.warnings,
        "shards": result.shards,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _check_kept(root: str, scan: _Scan, result: _Result) -> None:
    # A class whose every file was refused would silently vanish from a split.
    for split, folder in SPLITS.items():
        for name in scan.classes:
            if result.counts[split][name] == 0:
                prefix = f"{folder}/{name}/"
                why = collections.Counter(s["reason"] for s in result.skipped
                                          if s["path"].startswith(prefix))
                reasons = ", ".join(f"{r} {n}" for r, n in sorted(why.items()))
                raise RunnerError(f"class folder {os.path.join(root, folder, name)} "
                                  f"has no usable images (skipped: {reasons})")


def _write_shards(scan: _Scan, out: storage.Location, version: str,
                  settings: _Settings) -> _Result:
    result = _Result(counts={s: dict.fromkeys(scan.classes, 0) for s in SPLITS})
    progress = _Progress(len(scan.items))
    with _executor(settings.workers) as executor:
        for split in SPLITS:
            items = sorted((i for i in scan.items if i.split == split),
                           key=lambda i: hashlib.md5(i.rel.encode()).digest())
            rows = []
            for item, outcome in _decode_all(executor, items, settings):
                progress.tick()
                if _keep(item, outcome, scan.classes, result):
                    rows.append(_row(item, outcome))
                if len(rows) == settings.shard_rows:
                    _flush(out, version, split, rows, result)
                    rows = []
            if rows:
                _flush(out, version, split, rows, result)
    return result


def _keep(item: _Item, outcome: _Outcome, classes: list[str], result: _Result):
    for text in outcome.warnings:
        result.warnings.append({"path": item.rel, "detail": text})
    if outcome.reason:
        result.skipped.append(_skip_record(item.rel, outcome.reason, outcome.detail))
        return False
    result.counts[item.split][classes[item.label]] += 1
    return True


def _row(item: _Item, outcome: _Outcome) -> tuple:
    fold = zlib.crc32(item.rel.encode()) % 100
    return (outcome.image, item.label, item.rel, outcome.height, outcome.width, fold)


def _flush(out, version, split, rows, result) -> None:
    rel = f"{version}/{split}/part-{len(result.shards[split]):05d}.parquet"
    _write_shard(out.join(rel), rows)
    result.shards[split].append(rel)


def _write_shard(loc: storage.Location, rows: list[tuple]) -> None:
    columns = list(zip(*rows))
    table = pa.Table.from_arrays(
        [pa.array(col, type=f.type) for col, f in zip(columns, SCHEMA)],
        schema=SCHEMA)
    loc.fs.create_dir(loc.path.rsplit("/", 1)[0], recursive=True)
    # Pixels barely compress; snappy is nearly free and trims flat backgrounds.
    pq.write_table(table, loc.path, filesystem=loc.fs, compression="snappy")
    log.debug("wrote %s (%d rows)", loc.uri, len(rows))


def _delete_quietly(loc: storage.Location) -> None:
    try:
        if storage.exists(loc):
            loc.fs.delete_dir(loc.path)
    except (OSError, RunnerError) as err:  # RunnerError: storage gave up retrying
        log.warning("could not remove unfinished shards %s: %s", loc.uri, err)


def _remove_stale(out: storage.Location, keep: str) -> None:
    """Delete shard versions the manifest no longer names (old or unfinished)."""
    infos = out.fs.get_file_info(pafs.FileSelector(out.path))
    for info in infos:
        if (info.type == pafs.FileType.Directory and info.base_name != keep
                and info.base_name.startswith(SHARD_PREFIX)):
            _delete_quietly(out.join(info.base_name))


class _Progress:
    """Counts decoded images and logs a line every PROGRESS_EVERY of them."""

    def __init__(self, total: int):
        self.total, self.done, self.start = total, 0, time.monotonic()

    def tick(self) -> None:
        self.done += 1
        if self.done % PROGRESS_EVERY == 0 and self.done < self.total:
            rate = self.done / max(time.monotonic() - self.start, 1e-9)
            log.info("decoded %d/%d images (%.0f/s)", self.done, self.total, rate)


# ------------------------------------------------------------------ decoding


class _Inline:
    """Stands in for a process pool when one worker is asked for (tests, tiny
    folders): no start-up cost and everything runs in this process."""

    @staticmethod
    def map(fn, iterable, chunksize=1):
        return map(fn, iterable)


@contextlib.contextmanager
def _executor(workers: int):
    if workers == 1:
        yield _Inline()
        return
    # forkserver, not fork: the caller may already run Ray's threads, and
    # forking a threaded process can deadlock the child.
    context = multiprocessing.get_context("forkserver")
    pool = ProcessPoolExecutor(workers, mp_context=context)
    try:
        yield pool
    finally:
        # On failure, drop queued chunks instead of decoding the whole folder.
        pool.shutdown(wait=True, cancel_futures=True)


def _decode_all(executor, items: list[_Item], settings: _Settings
                ) -> Iterator[tuple[_Item, _Outcome]]:
    tasks = ((i.path, settings.base_size, settings.max_pixels) for i in items)
    outcomes = executor.map(_decode_task, tasks, chunksize=CHUNK)
    return zip(items, outcomes)


def _decode_task(task: tuple[str, int, int]) -> _Outcome:
    return decode_image(*task)


def decode_image(path: str, base_size: int, max_pixels: int = MAX_PIXELS) -> _Outcome:
    """Read and decode one file into ``base_size`` square RGB bytes, or say why
    not. Never raises for a bad file: one bad image must not stop an ingest."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        return _Outcome(reason="unreadable", detail=str(err.strerror or err))
    if not data:
        return _Outcome(reason="empty", detail="0 bytes")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outcome = _decode_bytes(data, base_size, max_pixels)
    texts = tuple(sorted({str(w.message) for w in caught}))
    return outcome._replace(warnings=texts) if outcome.image else outcome


def _decode_bytes(data: bytes, base_size: int, max_pixels: int) -> _Outcome:
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        return _Outcome(reason="too_large", detail=str(err))
    except UnidentifiedImageError as err:
        return _Outcome(reason="not_an_image", detail=_describe(err))
    except Exception as err:  # a known format whose header breaks off or lies
        return _Outcome(reason=_failure_reason(err), detail=_describe(err))
    width, height = img.size
    if width * height > max_pixels:
        return _Outcome(reason="too_large",
                        detail=f"{width}x{height} pixels > limit {max_pixels}")
    try:
        img, (height, width) = _upright(img, base_size)
        rgb = _to_rgb(img)
    except _UnsupportedMode as err:
        return _Outcome(reason="unsupported_mode", detail=str(err))
    except Image.DecompressionBombError as err:
        return _Outcome(reason="too_large", detail=str(err))
    except Exception as err:
        return _Outcome(reason=_failure_reason(err), detail=_describe(err))
    rgb = rgb.resize((base_size, base_size), Image.Resampling.BILINEAR)
    return _Outcome(image=rgb.tobytes(), height=height, width=width)


def _describe(err: Exception) -> str:
    """The error in one short line. Images are decoded from bytes in memory,
    so PIL names a buffer object where it would name the file; that part is
    dropped (the skip record names the file)."""
    text = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(err))
    return f"{type(err).__name__}: {text}"[:200]


def _failure_reason(err: Exception) -> str:
    truncated = isinstance(err, EOFError) or "truncat" in str(err).lower()
    return "truncated" if truncated else "corrupt"


def _upright(img: Image.Image, base_size: int):
    """Decode pixels (JPEG at the smallest DCT scale still >= base_size) and
    apply EXIF orientation; also return the upright original (height, width)."""
    width, height = img.size
    if img.format == "JPEG":
        img.draft("RGB", (base_size, base_size))
    img.load()
    before = img.size
    try:
        img = ImageOps.exif_transpose(img)
    except Exception as err:  # a broken EXIF block should not cost the photo
        warnings.warn(f"EXIF orientation not applied: {_describe(err)}")
    if img.size != before and img.size == before[::-1]:
        width, height = height, width
    return img, (height, width)


class _UnsupportedMode(Exception):
    pass


_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_SIXTEEN_BIT = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
_PLAIN_MODES = frozenset({"1", "L", "P", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"})


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB; alpha composited on white (see module doc)."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in _SIXTEEN_BIT:
        return _scale_to_8bit(img).convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in img.info:
        return _on_white(img)
    if mode not in _PLAIN_MODES:
        # Float data has no agreed range, so any scaling would be a guess.
        raise _UnsupportedMode(f"pixel mode {mode} has no defined 8-bit range")
    return img.convert("RGB")


def _on_white(img: Image.Image) -> Image.Image:
    if img.mode == "La":  # Pillow has no direct La -> RGBA conversion
        img = img.convert("LA")
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _scale_to_8bit(img: Image.Image) -> Image.Image:
    # Pillow's own I -> L conversion clips at 255 instead of scaling, which
    # would turn most 16-bit images white.
    pixels = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
    return Image.fromarray(((pixels * 255 + 32767) // 65535).astype(np.uint8), "L")

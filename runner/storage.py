"""Every path a run reads or writes, local or remote, through pyarrow.fs.

A storage root is a local path or any URI pyarrow understands (``s3://``,
``gs://``, ``hdfs://``, ``file://``). Writes that others read (manifests,
lineage) go through :func:`write_json`, which writes a temporary file next to
the target and renames it, so a reader never sees half a file. On object
stores a rename is a copy, but the object appears whole or not at all.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass

import pyarrow.fs as pafs

from runner.errors import RunnerError


@dataclass(frozen=True)
class Location:
    """A filesystem plus a path on it; ``uri`` is what the user wrote."""

    fs: pafs.FileSystem
    path: str
    uri: str

    def join(self, *parts: str) -> "Location":
        path = "/".join([self.path.rstrip("/"), *parts])
        uri = "/".join([self.uri.rstrip("/"), *parts])
        return Location(self.fs, path, uri)

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)


def resolve(uri: str) -> Location:
    """Turn a path or URI into a :class:`Location`; local paths become absolute."""
    if "://" not in uri:
        path = os.path.abspath(os.path.expanduser(uri))
        return Location(pafs.LocalFileSystem(), path, path)
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except (pafs.ArrowInvalid, ValueError, OSError) as err:
        raise RunnerError(f"storage {uri!r}: {err}") from err
    return Location(fs, path, uri)


def exists(loc: Location) -> bool:
    return loc.fs.get_file_info(loc.path).type != pafs.FileType.NotFound


def makedirs(loc: Location) -> None:
    loc.fs.create_dir(loc.path, recursive=True)


def read_bytes(loc: Location) -> bytes:
    with loc.fs.open_input_stream(loc.path) as f:
        return f.read()


def write_bytes(loc: Location, data: bytes) -> None:
    """Write ``data`` to ``loc`` so that readers see the old or the new file."""
    parent = loc.path.rsplit("/", 1)[0]
    loc.fs.create_dir(parent, recursive=True)
    tmp = f"{loc.path}.tmp-{uuid.uuid4().hex[:8]}"
    with loc.fs.open_output_stream(tmp) as f:
        f.write(data)
    loc.fs.move(tmp, loc.path)


def read_json(loc: Location):
    try:
        return json.loads(read_bytes(loc))
    except FileNotFoundError as err:
        raise RunnerError(f"{loc.uri}: no such file") from err
    except json.JSONDecodeError as err:
        raise RunnerError(f"{loc.uri}: not valid JSON ({err})") from err


def write_json(loc: Location, obj) -> None:
    write_bytes(loc, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def check_writable(loc: Location) -> None:
    """Fail early, naming the root, if nothing can be written under ``loc``."""
    probe = loc.join(f".write-probe-{uuid.uuid4().hex[:8]}")
    try:
        makedirs(loc)
        write_bytes(probe, b"ok")
        loc.fs.delete_file(probe.path)
    except OSError as err:
        raise RunnerError(f"storage root {loc.uri} is not writable: {err}") from err


def download_dir(loc: Location, local: str) -> str:
    """Copy a remote folder to ``local`` (a no-op returning the path itself when
    ``loc`` is already local). Returns the local folder to read from."""
    if loc.is_local:
        return loc.path
    pafs.copy_files(loc.path, local, source_filesystem=loc.fs,
                    destination_filesystem=pafs.LocalFileSystem())
    return local


def upload_dir(local: str, loc: Location) -> None:
    """Copy a local folder's files to ``loc`` (local or remote)."""
    makedirs(loc)
    pafs.copy_files(local, loc.path, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=loc.fs)

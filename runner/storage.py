"""Every path a run reads or writes, local or remote, through pyarrow.fs.

A storage root is a local path or any URI pyarrow understands (``s3://``,
``gs://``, ``hdfs://``, ``file://``). Writes that others read (manifests,
lineage) go through :func:`write_json`, which writes a temporary file next to
the target and renames it, so a reader never sees half a file. On object
stores a rename is a copy, but the object appears whole or not at all.

S3: credentials come from the environment (``AWS_ACCESS_KEY_ID``...), the AWS
config files or the instance role; an S3-compatible store (MinIO, Ceph) is
named by ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (e.g.
``http://127.0.0.1:9000``), which pyarrow reads when it parses the URI, or by
the URI itself (``s3://bucket/run?endpoint_override=HOST:PORT&scheme=http``).
Query parameters stay on every URI derived with :meth:`Location.join`, so they
travel to Ray's worker processes with the paths. Every S3 filesystem gets
connect and request timeouts (``CONNECT_TIMEOUT_S``, ``REQUEST_TIMEOUT_S``;
``connect_timeout=``/``request_timeout=`` in the URI override them), so a dead
or silent endpoint fails instead of hanging. On Linux the request timeout is
the longest stall with no bytes moving, not a cap on a whole transfer.

Retries: each call below is retried when it fails in a way that may pass
(connection refused or reset, timeouts, throttling, HTTP 5xx), up to
``RUNNER_STORAGE_ATTEMPTS`` tries (default :data:`ATTEMPTS`) with exponential
backoff from ``RUNNER_STORAGE_RETRY_DELAY`` seconds (default
:data:`RETRY_DELAY_S`) and full jitter. Each retry logs a warning naming the
operation and URI; the last failure raises RunnerError ("storage: could not
write s3://b/run/lineage.json after 4 attempts: ..."). A missing file, a
refused permission or a bad request fails at once. This sits above the AWS
SDK's own per-request retries, which stay on (Ray's processes use them too).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import pyarrow.fs as pafs

from runner.errors import RunnerError

log = logging.getLogger(__name__)

T = TypeVar("T")

ATTEMPTS = 4             # tries per call; env RUNNER_STORAGE_ATTEMPTS
RETRY_DELAY_S = 1.0      # first backoff, doubling; env RUNNER_STORAGE_RETRY_DELAY
MAX_DELAY_S = 30.0       # no single backoff is longer
CONNECT_TIMEOUT_S = 3.0  # S3: establishing a connection
REQUEST_TIMEOUT_S = 5.0  # S3: longest stall with no bytes moving
_TIMEOUT_KEYS = ("connect_timeout", "request_timeout")

# Failures that may pass: pyarrow's S3 errors name the AWS error type or the
# HTTP status; local ones carry an errno.
_TRANSIENT_MARKERS = ("NETWORK_CONNECTION", "SLOW_DOWN", "THROTTLING",
                      "SERVICE_UNAVAILABLE", "INTERNAL_FAILURE", "REQUEST_TIMEOUT",
                      "HTTP status 5", "HTTP status 429", "HTTP status 408",
                      "curlCode", "Connection refused", "Connection reset",
                      "timed out")
_TRANSIENT_ERRNOS = frozenset({errno.EAGAIN, errno.EINTR, errno.ETIMEDOUT,
                               errno.ECONNRESET, errno.ECONNREFUSED,
                               errno.ECONNABORTED, errno.EPIPE, errno.EHOSTUNREACH,
                               errno.ENETUNREACH, errno.ENETDOWN})
_PERMANENT_TYPES = (FileNotFoundError, PermissionError, FileExistsError,
                    IsADirectoryError, NotADirectoryError)


@dataclass(frozen=True)
class Location:
    """A filesystem plus a path on it; ``uri`` is what the user wrote (with
    any query parameters kept at its end)."""

    fs: pafs.FileSystem
    path: str
    uri: str

    def join(self, *parts: str) -> Location:
        path = "/".join([self.path.rstrip("/"), *parts])
        base, query = _split_query(self.uri)
        return Location(self.fs, path, "/".join([base.rstrip("/"), *parts]) + query)

    @property
    def parent(self) -> Location:
        base, query = _split_query(self.uri)
        return Location(self.fs, self.path.rstrip("/").rsplit("/", 1)[0],
                        base.rstrip("/").rsplit("/", 1)[0] + query)

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)


def _split_query(uri: str) -> tuple[str, str]:
    """(``uri`` without its query, ``?query`` or ""); local paths have none."""
    if "://" not in uri or "?" not in uri:
        return uri, ""
    base, query = uri.split("?", 1)
    return base, "?" + query


def resolve(uri: str) -> Location:
    """Turn a path or URI into a :class:`Location`; local paths become absolute."""
    if "://" not in uri:
        path = os.path.abspath(os.path.expanduser(uri))
        return Location(pafs.LocalFileSystem(), path, path)
    pyarrow_uri, timeouts = _split_timeouts(uri)
    try:
        fs, path = pafs.FileSystem.from_uri(pyarrow_uri)
        if isinstance(fs, pafs.S3FileSystem):
            fs = _with_timeouts(fs, timeouts)
    except (pafs.ArrowInvalid, ValueError, OSError) as err:
        raise RunnerError(f"storage {uri!r}: {err}") from err
    return Location(fs, path, uri)


def _split_timeouts(uri: str) -> tuple[str, dict]:
    """(``uri`` without our timeout parameters, which pyarrow's parser refuses;
    those parameters)."""
    base, query = _split_query(uri)
    params = [p for p in query.lstrip("?").split("&") if p]
    ours = [p for p in params if p.split("=", 1)[0] in _TIMEOUT_KEYS]
    rest = "&".join(p for p in params if p not in ours)
    bad = [p for p in ours if "=" not in p]
    if bad:
        raise RunnerError(f"storage {uri!r}: {bad[0]} needs a value in seconds")
    return base + ("?" + rest if rest else ""), dict(p.split("=", 1) for p in ours)


def _with_timeouts(fs: pafs.S3FileSystem, given: dict) -> pafs.S3FileSystem:
    """The same S3 filesystem with connect and request timeouts set. It is
    rebuilt from its own pickled options, the documented way pyarrow copies a
    filesystem (the SDK's default retries come back with it)."""
    make, (options,) = fs.__reduce__()
    options["connect_timeout"] = float(given.get("connect_timeout", CONNECT_TIMEOUT_S))
    options["request_timeout"] = float(given.get("request_timeout", REQUEST_TIMEOUT_S))
    return make(options)


def within(root: Location, path: str) -> Location:
    """``path`` (a path on ``root.fs`` below ``root``, as Ray reports them) as
    a Location whose URI is built from ``root``'s, query parameters included."""
    if root.is_local:
        return Location(root.fs, path, path)
    base = root.path.rstrip("/")
    if path.rstrip("/") == base:
        return root
    if not path.startswith(base + "/"):
        raise RunnerError(f"{path} does not lie under the storage root {root.uri}")
    return root.join(path[len(base) + 1:].rstrip("/"))


# ------------------------------------------------------------------ retries


def transient(err: OSError) -> bool:
    """Whether ``err`` may pass if the call is repeated."""
    if isinstance(err, _PERMANENT_TYPES):
        return False
    if isinstance(err, (ConnectionError, TimeoutError)) or \
            err.errno in _TRANSIENT_ERRNOS:
        return True
    text = str(err)
    return any(marker in text for marker in _TRANSIENT_MARKERS)


def _setting(name: str, default, kind, low):
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or value < low:
        what = "a whole number" if kind is int else "a number"
        raise RunnerError(f"{name}={raw!r}: must be {what} >= {low:g}")
    return value


def retry_settings() -> tuple[int, float]:
    """(attempts, first backoff in seconds), from the environment or defaults."""
    return (_setting("RUNNER_STORAGE_ATTEMPTS", ATTEMPTS, int, 1),
            _setting("RUNNER_STORAGE_RETRY_DELAY", RETRY_DELAY_S, float, 0.0))


def retry(op: str, loc: Location, call: Callable[[], T]) -> T:
    """Run ``call`` (the storage operation ``op`` on ``loc``), retrying
    transient failures with backoff; RunnerError naming both once they run out."""
    attempts, delay = retry_settings()
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except OSError as err:
            if not transient(err):
                raise
            reason = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
            if attempt == attempts:
                raise RunnerError(f"storage: could not {op} {loc.uri} after "
                                  f"{attempts} attempt{'s' * (attempts > 1)}: "
                                  f"{reason}") from err
            wait = random.uniform(0, min(MAX_DELAY_S, delay * 2 ** (attempt - 1)))
            log.warning("storage: %s %s failed (attempt %d of %d), retrying in "
                        "%.1f s: %s", op, loc.uri, attempt, attempts, wait, reason)
            time.sleep(wait)
    raise AssertionError("unreachable")


# --------------------------------------------------------------- operations


def exists(loc: Location) -> bool:
    info = retry("look up", loc, lambda: loc.fs.get_file_info(loc.path))
    return info.type != pafs.FileType.NotFound


def makedirs(loc: Location) -> None:
    retry("create folder", loc, lambda: loc.fs.create_dir(loc.path, recursive=True))


def read_bytes(loc: Location) -> bytes:
    def read():
        with loc.fs.open_input_stream(loc.path) as f:
            return f.read()
    return retry("read", loc, read)


def write_bytes(loc: Location, data: bytes) -> None:
    """Write ``data`` to ``loc`` so that readers see the old or the new file."""
    parent = loc.parent.path
    retry("write", loc, lambda: loc.fs.create_dir(parent, recursive=True))
    tmp = f"{loc.path}.tmp-{uuid.uuid4().hex[:8]}"

    def write():
        with loc.fs.open_output_stream(tmp) as f:
            f.write(data)
    retry("write", loc, write)
    try:
        retry("write", loc, lambda: loc.fs.move(tmp, loc.path))
    except BaseException:
        _delete_quietly(loc.fs, tmp)
        raise


def _delete_quietly(fs: pafs.FileSystem, path: str) -> None:
    try:
        if fs.get_file_info(path).type == pafs.FileType.File:
            fs.delete_file(path)
    except OSError as err:
        log.warning("could not remove the temporary file %s: %s", path, err)


def delete_file(loc: Location) -> None:
    retry("delete", loc, lambda: loc.fs.delete_file(loc.path))


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
        delete_file(probe)
    except OSError as err:
        raise RunnerError(f"storage root {loc.uri} is not writable: {err}") from err


def download_dir(loc: Location, local: str) -> str:
    """Copy a remote folder to ``local`` (a no-op returning the path itself when
    ``loc`` is already local). Returns the local folder to read from."""
    if loc.is_local:
        return loc.path
    # pyarrow creates the folders it lists, never the destination itself.
    os.makedirs(local, exist_ok=True)
    retry("download", loc, lambda: pafs.copy_files(
        loc.path, local, source_filesystem=loc.fs,
        destination_filesystem=pafs.LocalFileSystem()))
    return local


def upload_dir(local: str, loc: Location) -> None:
    """Copy a local folder's files to ``loc`` (local or remote)."""
    makedirs(loc)
    retry("upload", loc, lambda: pafs.copy_files(
        local, loc.path, source_filesystem=pafs.LocalFileSystem(),
        destination_filesystem=loc.fs))

"""``runner dashboard RUN``: a local web page that follows a growth run live.

What it reads: the run's two files, through :mod:`runner.storage` (so a local
folder and an ``s3://`` root work alike):

- ``lineage.json``, rewritten after every finished stage (trials, winners,
  test scores, the compute ledger, the baseline and the verdict);
- ``live.json``, rewritten by the driver on every trial event (the planned
  stages and their status, every trial's epochs so far, the estimate of the
  time left; see :mod:`runner.growth.progress`).

Either may be missing (a run that has not reached its first stage, a run
from before ``live.json``), half-written or unreadable: :func:`load_state`
then serves what there is plus a line in ``errors``; it never raises.

How it serves (stdlib ``ThreadingHTTPServer``, no other dependency):

- ``/`` is one self-contained page (inline CSS and script, no network) that
  polls ``/api/state`` every two seconds and swaps in the sections that
  changed, without reloading;
- ``/api/state`` is the merged state as JSON (:func:`merge`) with the page's
  sections already rendered under ``"html"``: they are drawn here in Python
  with the static report's helpers (:mod:`runner.report_html`), so the page's
  script only places them and keeps the clock. Its ETag is a hash of the two
  files' bytes, so a poll that finds nothing new costs two small reads and an
  empty 304 answer.

The page has no authentication: it binds to 127.0.0.1 unless told otherwise
(reach a remote head through an SSH tunnel), refuses requests whose Host
header names another machine (DNS rebinding), and sends a Content Security
Policy that allows only its own script.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import ipaddress
import json
import logging
import math
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from runner import storage
from runner.errors import RunnerError
from runner.growth.variants import best_epoch
from runner.report import rerooted
from runner.report_html import (
    COLORS,
    CSS,
    esc,
    flops_plot,
    fmt,
    lineage_tree,
    plot,
    verdict_box,
)

log = logging.getLogger(__name__)

LINEAGE, LIVE = "lineage.json", "live.json"  # as runner.growth writes them
DEFAULT_PORT = 8266  # next to Ray's dashboard (8265), clear of common ones
POLL_S = 2.0  # how often the page asks for news
RECORD_STATUS = {"done": "TERMINATED", "error": "ERROR"}  # lineage -> Tune's words
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


# --- reading the run -------------------------------------------------------------


def _read(root: storage.Location, name: str) -> tuple[bytes | None, str | None]:
    """(bytes, None), (None, None) when the file is absent, or (None, why)."""
    loc = root.join(name)
    try:
        return storage.read_bytes(loc), None
    except FileNotFoundError:
        return None, None
    except (OSError, RunnerError) as err:  # RunnerError: storage gave up retrying
        return None, f"{name}: cannot be read ({err})"


def _parse(name: str, data: bytes | None, errors: list[str]) -> dict | None:
    if data is None:
        return None
    try:
        obj = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        errors.append(f"{name}: not complete JSON ({err}); showing the rest")
        return None
    if not isinstance(obj, dict):
        errors.append(f"{name}: expected a JSON object, found {type(obj).__name__}")
        return None
    return obj


def read_files(root: storage.Location) -> tuple[str, tuple]:
    """(ETag, what was read) of the run's two files: the ETag changes exactly
    when what :func:`state_from` would make of them does."""
    read = (*_read(root, LINEAGE), *_read(root, LIVE), root.uri)
    return _etag(*read), read


def load_state(root: storage.Location) -> tuple[str, dict]:
    """(ETag, merged state) of the run under ``root``; never raises on what
    the files hold."""
    etag, read = read_files(root)
    return etag, state_from(read)


def state_from(read: tuple) -> dict:
    """The merged state, with ``errors``, from :func:`read_files`' answer."""
    lin, lin_err, live, live_err, uri = read
    errors = [e for e in (lin_err, live_err) if e]
    lineage, current = _parse(LINEAGE, lin, errors), _parse(LIVE, live, errors)
    # a copied or moved run folder shows its own paths
    written = (lineage or {}).get("storage") or (current or {}).get("storage")
    if isinstance(written, str):
        lineage, current = rerooted(lineage, written, uri), rerooted(current, written, uri)
    if lin is None and live is None and not errors:
        errors.append(f"no {LINEAGE} or {LIVE} under {uri} yet: the run has "
                      "not reached its first stage, or this is not a run folder")
    try:
        state = merge(lineage, current)
    except Exception as err:  # a file of an unexpected shape must not stop the page
        log.exception("cannot merge %s and %s", LINEAGE, LIVE)
        errors.append(f"cannot follow this run's files ({type(err).__name__}: {err})")
        state = merge(None, None)
    state["errors"] = errors
    return state


def _etag(*parts) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part if isinstance(part, bytes) else repr(part).encode())
        digest.update(b"\0")
    return f'"{digest.hexdigest()[:20]}"'


# --- merging lineage.json and live.json -------------------------------------------


def _dicts(value) -> list[dict]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _number(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _epochs(trial: dict) -> list[dict]:
    """A trial's epochs that say which epoch they are and what they scored."""
    return [e for e in _dicts(trial.get("epochs"))
            if _number(e.get("epoch")) and _number(e.get("val_acc"))]


def _finite(obj):
    """``obj`` with NaN and infinities as None: JSON has no such numbers and
    the browser's parser refuses Python's spelling of them."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _trial(live: dict | None, record: dict | None) -> dict:
    """One trial: the lineage's record (final) over the live one (so far),
    with the figures the page shows worked out."""
    t = {**(live or {}), **(record or {})}
    status = (RECORD_STATUS.get(record.get("status"), record.get("status"))
              if record else (live or {}).get("status"))
    t["status"] = str(status or "PENDING")
    if not isinstance(t.get("variant"), dict):
        t["variant"] = {}
    epochs = _epochs(record or {}) or _epochs(live or {})
    t["epochs"] = epochs
    last = epochs[-1] if epochs else {}
    t["epoch"], t["val_acc"] = last.get("epoch"), last.get("val_acc")
    t["images_per_s"] = last.get("images_per_s")
    if epochs and not isinstance(t.get("best"), dict):
        best = best_epoch(epochs)
        t["best"] = {"epoch": best["epoch"], "val_acc": best["val_acc"]}
    if epochs and not isinstance(t.get("compute"), dict):
        t["compute"] = {k: last.get(k) for k in ("flops", "cpu_s", "wall_s")}
    return t


def _trials(recorded: list[dict], live: list[dict]) -> list[dict]:
    by_name = {t.get("name"): t for t in recorded}
    live_by_name = {t.get("name"): t for t in live}
    names = list(dict.fromkeys([*live_by_name, *by_name]))
    return [_trial(live_by_name.get(n), by_name.get(n)) for n in names]


def _sum_compute(trials: list[dict]) -> dict:
    return {k: sum((t.get("compute") or {}).get(k) or 0.0 for t in trials)
            for k in ("flops", "cpu_s", "wall_s")}


def _stage(plan: dict, record: dict | None, live_trials: list[dict]) -> dict:
    """One stage: its lineage record if it is done, else its plan and trials."""
    s = dict(record or {})
    s["name"] = plan.get("name") or s.get("name")
    s["index"] = plan.get("index") or s.get("index")
    s["epochs"] = plan.get("epochs")
    s["planned_trials"] = plan.get("trials")
    s["status"] = "done" if record else str(plan.get("status") or "pending")
    s["trials"] = _trials(_dicts(s.get("trials")), live_trials)
    if not isinstance(s.get("compute"), dict) and s["trials"]:
        s["compute"] = _sum_compute(s["trials"])
    return s


def merge(lineage: dict | None, live: dict | None) -> dict:
    """The state the page shows: every stage of the plan (``live.json``) or of
    the record (``lineage.json``), in order, each with its trials; a stage in
    the lineage is done whatever ``live.json`` says."""
    lineage, live = lineage or {}, live or {}
    recorded = _dicts(lineage.get("stages"))
    if isinstance(lineage.get("baseline"), dict):
        recorded.append(dict(lineage["baseline"], name="baseline"))
    records = {s.get("name"): s for s in recorded}
    plans = {p.get("name"): p for p in _dicts(live.get("stages"))}
    for name, s in records.items():
        plans.setdefault(name, {"name": name, "index": s.get("index")})
    live_trials = _dicts(live.get("trials"))
    stages = [_stage(p, records.get(name),
                     [t for t in live_trials if t.get("stage") == name])
              for name, p in plans.items()]
    return {"run": live.get("run") or lineage.get("run"),
            "storage": live.get("storage") or lineage.get("storage"),
            "state": _run_state(lineage, live),
            "updated": live.get("updated"), "eta_s": live.get("eta_s"),
            "current": live.get("current"), "ray_logs": live.get("ray_logs"),
            "stages": stages, "verdict": lineage.get("verdict"),
            "finished": bool(lineage.get("finished"))}


def _run_state(lineage: dict, live: dict) -> str:
    if lineage.get("finished"):
        return "finished"
    if live.get("state"):
        return str(live["state"])
    return "unfinished" if lineage else "waiting"


# --- the page's sections, rendered here ------------------------------------------


def _flops(x) -> str:
    if not _number(x):
        return "–"
    for unit, name in ((1e12, "TFLOP"), (1e9, "GFLOP"), (1e6, "MFLOP")):
        if x >= unit:
            return f"{x / unit:.2f} {name}"
    return f"{x:.0f} FLOP"


def _num(x, spec: str) -> str:
    return fmt(x, spec) if _number(x) else "–"


def _head(state: dict) -> str:
    run_state = state["state"]
    logs = state.get("ray_logs")
    where = f' · Ray\'s logs <span class="path">{esc(logs)}</span>' if logs else ""
    return (f'<h1>run {esc(state.get("run") or "?")} <span id="run-state" '
            f'class="badge {esc(run_state)}" data-state="{esc(run_state)}">'
            f'{esc(run_state)}</span></h1><p>storage <span class="path">'
            f'{esc(state.get("storage") or "?")}</span>{where}</p>')


def _errors(state: dict) -> str:
    return "".join(f'<p class="error">{esc(e)}</p>' for e in state["errors"])


def _stage_line(s: dict) -> str:
    bits = [s["status"]]
    if s.get("epochs"):
        bits.append(f"{s['epochs']} epochs per trial")
    if s.get("planned_trials"):
        bits.append(f"{len(s['trials'])} of {s['planned_trials']} trials seen")
    if s.get("winner"):
        bits.append(f"winner {s['winner']} (val_acc {_num(s.get('val_acc'), '.4f')})")
    return (f'<li data-stage="{esc(s["name"])}" data-status="{esc(s["status"])}">'
            f'<span class="badge {esc(s["status"])}">{esc(s.get("index") or "")} '
            f'{esc(s["name"])}</span> {esc(" · ".join(bits))}</li>')


def _stages(state: dict) -> str:
    if not state["stages"]:
        return '<p class="muted">no stage has started yet</p>'
    return f'<ul class="stages">{"".join(map(_stage_line, state["stages"]))}</ul>'


def _row(s: dict, t: dict, color: str) -> str:
    best, c = t.get("best") or {}, t.get("compute") or {}
    epoch = t.get("epoch")
    status = f"{t['status']}: {t['error']}" if t.get("error") else t["status"]
    cells = [status, f"{epoch if epoch is not None else 0}"
             + (f" / {s['epochs']}" if s.get("epochs") else ""),
             _num(t.get("val_acc"), ".4f"),
             f"{_num(best.get('val_acc'), '.4f')} (epoch {best.get('epoch')})"
             if best else "–",
             _num(t.get("images_per_s"), ",.0f"), _flops(c.get("flops")),
             _num(c.get("cpu_s"), ".0f"), _num(c.get("wall_s"), ".0f")]
    cls = "won" if t.get("name") == s.get("winner") else t["status"].lower()
    key = f"{s['name']}/{t.get('name')}"
    return (f'<tr class="{esc(cls)}" data-trial="{esc(key)}" '
            f'data-status="{esc(t["status"])}" data-epoch="{esc(epoch or 0)}">'
            f'<td><span class="dot" style="background:{color}"></span>'
            f'{esc(t.get("name"))}</td>'
            + "".join(f"<td>{esc(v)}</td>" for v in cells) + "</tr>")


def _stage_trials(s: dict) -> str:
    title = (f'<h3 id="stage-{esc(s["name"])}">stage {esc(s.get("index") or "")} '
             f'{esc(s["name"])} <small>{esc(s["status"])}</small></h3>')
    if not s["trials"]:
        return title + '<p class="muted">no trial started yet</p>'
    colors = [COLORS[i % len(COLORS)] for i in range(len(s["trials"]))]
    head = "".join(f"<th>{h}</th>" for h in (
        "trial", "status", "epoch", "val_acc", "best val_acc", "images/s", "FLOPs",
        "cpu-s", "wall-s"))
    rows = "".join(_row(s, t, c) for t, c in zip(s["trials"], colors))
    series = [(t.get("name"), c, [(e["epoch"], e["val_acc"]) for e in t["epochs"]])
              for t, c in zip(s["trials"], colors)]
    return (title + f'<table data-stage="{esc(s["name"])}"><tr>{head}</tr>{rows}'
            "</table>" + plot(series, "epoch", "validation accuracy", legend=False,
                              width=520, height=240, integer_x=True))


def _trials_section(state: dict) -> str:
    started = [s for s in state["stages"] if s["trials"] or s["status"] != "pending"]
    return "".join(map(_stage_trials, started)) or \
        '<p class="muted">no trial started yet</p>'


def _as_lineage(state: dict, done_only: bool) -> dict:
    """The shape runner.report_html's helpers draw from."""
    keep = [s for s in state["stages"] if s["trials"]
            and (s["status"] == "done" or not done_only)]
    return {"stages": [s for s in keep if s["name"] != "baseline"],
            "baseline": next((s for s in keep if s["name"] == "baseline"), None)}


def _ledger(state: dict) -> str:
    head = "".join(f"<th>{h}</th>" for h in (
        "stage", "status", "trials", "FLOPs", "cpu-s", "wall-s", "path FLOPs",
        "path cpu-s", "path wall-s"))
    rows = []
    for s in state["stages"]:
        c, p = s.get("compute") or {}, s.get("path_compute") or {}
        cells = [f"{s.get('index') or ''} {s['name']}", s["status"], len(s["trials"]),
                 _flops(c.get("flops")), _num(c.get("cpu_s"), ".0f"),
                 _num(c.get("wall_s"), ".0f"), _flops(p.get("flops")),
                 _num(p.get("cpu_s"), ".0f"), _num(p.get("wall_s"), ".0f")]
        rows.append(f'<tr data-ledger="{esc(s["name"])}">'
                    + "".join(f"<td>{esc(v)}</td>" for v in cells) + "</tr>")
    note = ('<p class="muted">a stage\'s own compute counts all its trials; the '
            "path counts each winner and its ancestors. Figures of a running "
            "stage are so far.</p>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>{note}"


def _tree(state: dict) -> str:
    return lineage_tree(_as_lineage(state, done_only=False)) or \
        '<p class="muted">no trial started yet</p>'


def _path_plot(state: dict) -> str:
    done = _as_lineage(state, done_only=True)
    if not done["stages"]:
        return '<p class="muted">drawn once the first stage has its winner</p>'
    return flops_plot(done)


RENDERERS = {
    "head": _head, "errors": _errors, "stages": _stages,
    "verdict": lambda state: verdict_box(state.get("verdict")),
    "trials": _trials_section, "tree": _tree, "ledger": _ledger,
    "path": _path_plot,
}


def render_sections(state: dict) -> dict[str, str]:
    """The page's sections as HTML fragments, by element id; a section that
    cannot be drawn from these files says so and leaves the others whole."""
    out = {}
    for name, render in RENDERERS.items():
        try:
            out[name] = render(state)
        except Exception as err:
            log.exception("cannot draw the %s section", name)
            out[name] = (f'<p class="error">cannot draw this from the run\'s files '
                         f'({esc(type(err).__name__)}: {esc(err)})</p>')
    return out


# --- the page ----------------------------------------------------------------------

SCRIPT = """
"use strict";
const POLL_MS = POLL_MS_VALUE;
let etag = null, state = null, receivedAt = 0, shown = {};
function fmtAge(s) {
  s = Math.max(0, Math.round(s));
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
  return Math.floor(s / 3600) + " h " + Math.floor(s % 3600 / 60) + " min";
}
function show(s) {
  for (const [id, html] of Object.entries(s.html)) {
    const el = document.getElementById(id);
    if (el && shown[id] !== html) { el.innerHTML = html; shown[id] = html; }
  }
  document.body.dataset.state = s.state;
  document.title = "runner dashboard: " + (s.run || "?") + " (" + s.state + ")";
}
function tick() {
  const upd = document.getElementById("updated"), eta = document.getElementById("eta");
  if (!state) return;
  const since = (Date.now() - receivedAt) / 1000;
  if (state.updated) {
    const age = state.served - state.updated + since;
    upd.textContent = new Date(state.updated * 1000).toLocaleTimeString() +
      " (" + fmtAge(age) + " ago)";
    upd.dataset.updated = state.updated;
  } else { upd.textContent = "–"; }
  if (state.state === "running" && state.eta_s !== null && state.updated) {
    const left = state.eta_s - (state.served - state.updated + since);
    eta.textContent = left > 0 ? "about " + fmtAge(left) + " left (estimate)"
                               : "any moment (estimate)";
  } else { eta.textContent = state.state === "finished" ? "done" : "–"; }
}
async function poll() {
  const link = document.getElementById("link");
  try {
    const r = await fetch("api/state", {cache: "no-store",
                                         headers: etag ? {"If-None-Match": etag} : {}});
    if (r.status === 200) {
      state = await r.json(); etag = r.headers.get("ETag"); receivedAt = Date.now();
      show(state);
    } else if (r.status !== 304) { throw new Error("HTTP " + r.status); }
    link.textContent = ""; link.className = "";
  } catch (err) {
    link.textContent = "cannot reach the dashboard server (" + err.message +
      "); retrying"; link.className = "error";
  }
  tick();
  setTimeout(poll, POLL_MS);
}
setInterval(tick, 1000);
poll();
""".replace("POLL_MS_VALUE", str(round(POLL_S * 1000)))

PAGE_CSS = CSS + """
h3{margin:22px 0 6px}.error{color:#a33;font-weight:600}
.badge{display:inline-block;padding:1px 8px;border-radius:9px;background:#eee;
font-size:12px;font-weight:600;vertical-align:middle}
.badge.running{background:#dbeafe;color:#1e40af}.badge.done,.badge.finished{
background:#e8f6ec;color:#1f6f3a}.badge.failed{background:#fde2e2;color:#a33}
ul.stages{list-style:none;padding:0}ul.stages li{margin:4px 0}
tr.running{background:#eef5ff}tr.error{color:#a33}
#clock{color:#555}
"""

PAGE = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>runner dashboard</title>
<link rel="icon" href="data:,"><style>{PAGE_CSS}</style></head>
<body data-state="loading">
<div id="head"><h1>runner dashboard</h1><p class="muted">loading…</p></div>
<p id="clock">last update <span id="updated">–</span> · time left
<span id="eta">–</span> <span id="link"></span></p>
<div id="errors"></div>
<h2>stages</h2><div id="stages"></div>
<div id="verdict"></div>
<h2>trials</h2><div id="trials"></div>
<h2>lineage</h2><div id="tree"></div>
<h2>compute ledger</h2><div id="ledger"></div>
<h2>validation accuracy vs cumulative training FLOPs</h2><div id="path"></div>
<script>{SCRIPT}</script>
</body></html>
"""

CSP = ("default-src 'none'; script-src 'sha256-"
       + base64.b64encode(hashlib.sha256(SCRIPT.encode()).digest()).decode()
       + "'; style-src 'unsafe-inline'; img-src data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


# --- the server ----------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_name(header: str) -> str:
    """The host part of a Host header (``[::1]:8266`` -> ``::1``)."""
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class DashboardServer(ThreadingHTTPServer):
    """Serves one run's page and state; ``url`` is where to open it."""

    daemon_threads = True

    def __init__(self, root: storage.Location, host: str, port: int):
        self.root = root
        self.host = host
        if ":" in host:
            self.address_family = socket.AF_INET6
        self._lock = threading.Lock()
        self._last: tuple[str, dict] | None = None
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"

    def host_allowed(self, header: str | None) -> bool:
        """Loopback names always; other names only when bound to them or to
        every interface (then the user chose to expose the page)."""
        name = _host_name(header or "")
        return (is_loopback(name) or name == self.host
                or self.host in ("0.0.0.0", "::", ""))

    def state(self) -> tuple[str, dict]:
        """(ETag, state with rendered sections); the rendering is kept until
        the files change."""
        etag, read = read_files(self.root)
        with self._lock:
            if self._last and self._last[0] == etag:
                return self._last
        state = state_from(read)
        state["html"] = render_sections(state)
        with self._lock:
            self._last = (etag, state)
        return etag, state

    def handle_error(self, request, client_address) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # the browser went away mid-answer: nothing to report
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    server: DashboardServer
    server_version = "runner-dashboard"

    def do_GET(self) -> None:
        if not self.server.host_allowed(self.headers.get("Host")):
            self._send(403, b"runner dashboard: this Host is not allowed; open "
                       b"http://127.0.0.1:PORT/ (through an SSH tunnel if remote)\n",
                       "text/plain; charset=utf-8")
            return
        path = urlsplit(self.path).path
        if path == "/":
            self._send(200, PAGE.encode(), "text/html; charset=utf-8",
                       {"Content-Security-Policy": CSP})
        elif path == "/api/state":
            self._state()
        else:
            self._send(404, b"not found\n", "text/plain; charset=utf-8")

    def _state(self) -> None:
        etag, state = self.server.state()
        if etag in (self.headers.get("If-None-Match") or ""):
            self._send(304, b"", None, {"ETag": etag})
            return
        body = json.dumps(_finite({**state, "served": time.time()}), default=str,
                          allow_nan=False).encode()
        self._send(200, body, "application/json", {"ETag": etag})

    def _send(self, code: int, body: bytes, ctype: str | None,
              headers: dict | None = None) -> None:
        self.send_response(code)
        if ctype:
            self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-cache")
        self.send_header("X-Content-Type-Options", "nosniff")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if body:
            self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:
        log.debug("%s " + format, self.address_string(), *args)


def make_server(run: str, host: str = "127.0.0.1",
                port: int = DEFAULT_PORT) -> DashboardServer:
    """A server for the run at ``run`` (path or URI), listening but not yet
    serving; ``port`` 0 picks a free one."""
    root = storage.resolve(run)
    if not storage.exists(root):
        raise RunnerError(f"{run}: no such run folder")
    if root.fs.get_file_info(root.path).type == pafs.FileType.File:
        raise RunnerError(f"{run}: is a file, not a run folder; pass the run's "
                          f"storage root (the folder that holds {LINEAGE})")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise RunnerError(f"--port {port}: must be 0..65535 (0 picks a free one)")
    try:
        return DashboardServer(root, host, port)
    except OSError as err:
        raise RunnerError(_listen_error(host, port, err)) from err


def _listen_error(host: str, port: int, err: OSError) -> str:
    """Why the server could not listen, naming the option to change."""
    reason = err.strerror or str(err)
    if err.errno == errno.EADDRINUSE:
        return (f"--port {port}: {host}:{port} is already in use; choose another "
                "--port (0 picks a free one)")
    if err.errno == errno.EACCES:
        return (f"--port {port}: not allowed to listen on {host}:{port} "
                f"({reason}); ports below 1024 need root, choose a higher --port")
    if isinstance(err, socket.gaierror) or err.errno == errno.EADDRNOTAVAIL:
        return (f"--host {host}: cannot listen there ({reason}); use 127.0.0.1 "
                "or an address of this machine")
    return (f"cannot listen on {host}:{port} ({reason}); check --host and "
            "--port (--port 0 picks a free one)")


def serve(run: str, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> None:
    """Serve until Ctrl-C."""
    server = make_server(run, host, port)
    if not is_loopback(host):
        print(f"runner: warning: the dashboard has no authentication; anyone who "
              f"can reach {host}:{server.server_address[1]} can read this run",
              file=sys.stderr)
    try:
        print(f"runner dashboard for {server.root.uri}: {server.url}  (Ctrl-C stops "
              "it)", flush=True)
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        print("runner dashboard: stopped", flush=True)
    finally:
        server.server_close()

"""``runner dashboard``: the state merge on hand-written run files, the HTTP
server on loopback, and the page in a real headless Chromium, first on files
written by the test, then following a real growth run while it trains.

Screenshots of the page go to ``$RUNNER_TEST_ARTIFACTS`` (default
``tests/artifacts/``, ignored by git).

Chromium comes from the OS: the ``chromium`` fixture finds it on PATH (or at
``$RUNNER_CHROMIUM``), installs the ``chromium`` package with apt-get when
running as root on a machine that has it, and otherwise skips the browser
tests with the reason.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from html import escape
from pathlib import Path

import pytest

from runner import storage
from runner.cli import main
from runner.dashboard import load_state, make_server, merge, render_sections
from runner.errors import RunnerError
from runner.growth.variants import best_epoch, verdict

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("RUNNER_TEST_ARTIFACTS") or ROOT / "tests" / "artifacts")
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
EVIL = "<img src=x onerror=alert(1)> & \"co\""


# --- run files, as runner.growth writes them --------------------------------------


def epochs(accs, gflop=40.0):
    return [{"epoch": i + 1, "val_acc": a, "val_loss": 0.6, "train_loss": 0.6,
             "train_acc": 0.6, "images_per_s": 250.0 + i, "data_wait_frac": 0.2,
             "flops": gflop * 1e9 * (i + 1), "cpu_s": 30.0 * (i + 1),
             "wall_s": 8.0 * (i + 1)} for i, a in enumerate(accs)]


def record(name, op, accs, gflop=40.0):
    """A trial of lineage.json (runner.growth.stage.trial_record)."""
    eps = [dict(e, checkpoint_path=f"/runs/demo/{name}/epoch-{e['epoch']:03d}")
           for e in epochs(accs, gflop)]
    best = best_epoch(eps)
    return {"name": name, "variant": {"op": op}, "lr": 0.001, "status": "done",
            "error": None, "epochs": eps, "transfer": None,
            "best": {"epoch": best["epoch"], "val_acc": best["val_acc"],
                     "flops": best["flops"], "checkpoint": best["checkpoint_path"]},
            "compute": {k: eps[-1][k] for k in ("flops", "cpu_s", "wall_s")}}


def stage_record(index, name, trials, winner, before=None):
    won = next(t for t in trials if t["name"] == winner)
    spent = before["path_compute"] if before else dict.fromkeys(won["compute"], 0.0)
    return {"index": index, "name": name, "trials": trials, "winner": winner,
            "parent": before and {"stage": before["name"], "trial": before["winner"],
                                  "checkpoint": before["checkpoint"]},
            "checkpoint": won["best"]["checkpoint"], "val_acc": won["best"]["val_acc"],
            "test": {"accuracy": 0.6, "images": 40, "per_class": {"cats": .6,
                                                                  "dogs": .6}},
            "compute": {k: sum(t["compute"][k] for t in trials) for k in spent},
            "path_compute": {k: spent[k] + won["compute"][k] for k in spent}}


def live_trial(stage, name, status, accs, op="widen_dense"):
    return {"stage": stage, "name": name, "status": status, "variant": {"op": op},
            "lr": 0.001, "started": 1.7e9, "epochs": epochs(accs)}


def live_file(statuses, trials, state="running", eta=90.0):
    """live.json: ``statuses`` maps stage name -> status, in the plan's order."""
    return {"run": "demo", "storage": "/runs/demo", "updated": time.time(),
            "state": state, "stages": [
                {"index": i + 1, "name": n, "epochs": 3, "trials": 2, "status": s}
                for i, (n, s) in enumerate(statuses.items())],
            "current": next(({"stage": t["stage"], "trial": t["name"]}
                             for t in trials if t["status"] == "RUNNING"), None),
            "trials": trials, "eta_s": eta}


SEED = stage_record(1, "seed", [record("scratch-lr0.001", "scratch", [.55, .61, .64])],
                    "scratch-lr0.001")


def write(root: Path, name: str, content) -> None:
    text = content if isinstance(content, str) else json.dumps(content)
    (root / name).write_text(text)


def state_of(root: Path) -> dict:
    return load_state(storage.resolve(str(root)))[1]


def trials_by_key(state):
    return {f"{s['name']}/{t['name']}": t for s in state["stages"] for t in s["trials"]}


# --- the merge -----------------------------------------------------------------------


def test_an_empty_run_folder_is_a_note_not_a_failure(tmp_path):
    state = state_of(tmp_path)
    assert state["state"] == "waiting" and state["stages"] == []
    assert len(state["errors"]) == 1 and "no lineage.json or live.json" in \
        state["errors"][0]
    html = render_sections(state)
    assert "no stage has started yet" in html["stages"]


def test_lineage_only_shows_every_stage_done_with_winner_and_verdict(tmp_path):
    widen = stage_record(2, "widen", [record("widen_dense-lr0.001", "widen_dense",
                                             [.66, .70], 90),
                                      record(EVIL, "plain_copy", [.5], 90)],
                         "widen_dense-lr0.001", SEED)
    base = stage_record(3, "baseline", [record("scratch-lr0.001", "scratch",
                                               [.5, .6, .62, .65], 60)],
                        "scratch-lr0.001")
    write(tmp_path, "lineage.json", {
        "run": "demo", "storage": str(tmp_path), "stages": [SEED, widen],
        "baseline": base, "verdict": verdict([SEED, widen], base), "finished": True})
    state = state_of(tmp_path)
    assert state["errors"] == [] and state["state"] == "finished"
    assert [(s["name"], s["status"]) for s in state["stages"]] == \
        [("seed", "done"), ("widen", "done"), ("baseline", "done")]
    trials = trials_by_key(state)
    assert {t["status"] for t in trials.values()} == {"TERMINATED"}
    assert trials["widen/widen_dense-lr0.001"]["epoch"] == 2
    html = render_sections(state)
    assert escape(state["verdict"]["text"]) in html["verdict"]
    assert 'data-ledger="baseline"' in html["ledger"]
    assert html["tree"].count('class="node won"') == 3  # seed, widen, baseline
    assert html["path"].count("<polyline") == 2  # growth path and baseline


def test_live_only_shows_the_running_trial_its_epoch_and_compute_so_far(tmp_path):
    write(tmp_path, "live.json", live_file(
        {"seed": "running", "deepen": "pending", "baseline": "pending"},
        [live_trial("seed", "scratch-lr0.001", "RUNNING", [.55, .58])]))
    state = state_of(tmp_path)
    assert state["errors"] == [] and state["state"] == "running"
    assert state["eta_s"] == 90.0 and state["current"]["trial"] == "scratch-lr0.001"
    assert [s["status"] for s in state["stages"]] == ["running", "pending", "pending"]
    trial = trials_by_key(state)["seed/scratch-lr0.001"]
    assert (trial["status"], trial["epoch"], trial["best"]["val_acc"]) == \
        ("RUNNING", 2, .58)
    assert trial["compute"] == {"flops": 80e9, "cpu_s": 60.0, "wall_s": 16.0}
    html = render_sections(state)
    assert ('data-trial="seed/scratch-lr0.001" data-status="RUNNING" '
            'data-epoch="2"') in html["trials"]
    assert "2 / 3" in html["trials"] and "no verdict" in html["verdict"]


def test_a_stage_in_the_lineage_is_done_whatever_live_json_says(tmp_path):
    """live.json lags behind: it still has the seed trial running; the lineage
    has the stage with its winner. The next stage's trials come from live."""
    write(tmp_path, "lineage.json", {"run": "demo", "stages": [SEED],
                                     "finished": False})
    write(tmp_path, "live.json", live_file(
        {"seed": "running", "widen": "running"},
        [live_trial("seed", "scratch-lr0.001", "RUNNING", [.55]),
         live_trial("widen", "widen_dense-lr0.001", "TERMINATED", [.66, .67]),
         live_trial("widen", "widen_conv-lr0.001", "RUNNING", [.65])]))
    state = state_of(tmp_path)
    seed, widen = state["stages"]
    assert seed["status"] == "done" and seed["winner"] == "scratch-lr0.001"
    assert seed["trials"][0]["status"] == "TERMINATED"
    assert seed["trials"][0]["epoch"] == 3  # the lineage's epochs, not live's
    assert widen["status"] == "running" and "winner" not in widen
    assert [t["status"] for t in widen["trials"]] == ["TERMINATED", "RUNNING"]
    assert widen["compute"]["flops"] == pytest.approx(120e9)  # 80 + 40 GFLOP so far
    # The tree hangs the running stage's trials under the seed's winner.
    tree = render_sections(state)["tree"]
    assert tree.index("scratch-lr0.001") < tree.index("widen_conv-lr0.001")


def test_a_truncated_live_json_serves_the_lineage_and_says_why(tmp_path):
    write(tmp_path, "lineage.json", {"run": "demo", "stages": [SEED]})
    full = json.dumps(live_file({"seed": "done", "widen": "running"}, []))
    write(tmp_path, "live.json", full[: len(full) // 2])
    state = state_of(tmp_path)
    assert [(s["name"], s["status"]) for s in state["stages"]] == [("seed", "done")]
    assert len(state["errors"]) == 1 and state["errors"][0].startswith(
        "live.json: not complete JSON")
    assert "live.json" in render_sections(state)["errors"]


def test_files_of_the_wrong_shape_still_render_every_section(tmp_path):
    write(tmp_path, "lineage.json", "[1, 2]")
    write(tmp_path, "live.json", {"stages": [{"name": "seed"}, "junk"], "trials": [
        {"stage": "seed", "name": "a", "variant": None, "epochs": [{"epoch": 1}]},
        {"stage": "seed", "name": "b", "epochs": "soon"}, 7]})
    state = state_of(tmp_path)
    assert "lineage.json: expected a JSON object" in state["errors"][0]
    assert [t["epoch"] for t in state["stages"][0]["trials"]] == [None, None]
    html = render_sections(state)
    assert set(html) == {"head", "errors", "stages", "verdict", "trials", "tree",
                         "ledger", "path"}
    assert "cannot draw" not in "".join(html.values())


def test_names_from_the_files_are_escaped(tmp_path):
    write(tmp_path, "live.json", live_file(
        {EVIL: "running"}, [live_trial(EVIL, EVIL, "RUNNING", [.5])]))
    html = "".join(render_sections(state_of(tmp_path)).values())
    assert "<img" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html


def test_merge_of_nothing_is_an_empty_waiting_run():
    assert merge(None, None)["stages"] == [] and merge({}, {})["state"] == "waiting"


# --- the server --------------------------------------------------------------------


@pytest.fixture
def serve():
    """Start a dashboard server for a run folder on 127.0.0.1, a free port, in a
    thread; returns its URL. Stopped after the test."""
    servers = []

    def start(root) -> str:
        server = make_server(str(root), "127.0.0.1", 0)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                         daemon=True).start()
        servers.append(server)
        return server.url

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def get(url, **headers):
    """(status, headers, body) of a GET, errors included."""
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


def test_state_is_polled_cheaply_with_an_etag(tmp_path, serve):
    write(tmp_path, "live.json", live_file(
        {"seed": "running"}, [live_trial("seed", "s-lr0.001", "RUNNING", [.5])]))
    url = serve(tmp_path)
    status, headers, body = get(url + "api/state")
    assert status == 200 and headers["Content-Type"] == "application/json"
    state, etag = json.loads(body), headers["ETag"]
    assert state["stages"][0]["trials"][0]["epoch"] == 1
    assert 'data-epoch="1"' in state["html"]["trials"]
    status, headers, body = get(url + "api/state", **{"If-None-Match": etag})
    assert (status, body, headers["ETag"]) == (304, b"", etag)
    write(tmp_path, "live.json", live_file(
        {"seed": "running"}, [live_trial("seed", "s-lr0.001", "RUNNING", [.5, .6])]))
    status, headers, body = get(url + "api/state", **{"If-None-Match": etag})
    assert status == 200 and headers["ETag"] != etag
    assert json.loads(body)["stages"][0]["trials"][0]["epoch"] == 2


def test_nan_in_the_metrics_is_served_as_strict_json(tmp_path, serve):
    trial = live_trial("seed", "s-lr0.001", "RUNNING", [.5, .6])
    trial["epochs"][1]["val_loss"] = float("nan")
    trial["epochs"].append(dict(trial["epochs"][1], epoch=3, val_acc=float("nan")))
    write(tmp_path, "live.json", live_file({"seed": "running"}, [trial]))
    body = get(serve(tmp_path) + "api/state")[2]

    def refuse(name):
        raise AssertionError(f"{name} in the JSON")
    state = json.loads(body, parse_constant=refuse)
    (served,) = state["stages"][0]["trials"]
    assert served["epochs"][1]["val_loss"] is None
    assert served["epoch"] == 2  # an epoch without a score is not shown


def test_the_page_is_one_self_contained_document(tmp_path, serve):
    status, headers, body = get(serve(tmp_path))
    page = body.decode()
    assert status == 200 and page.startswith("<!DOCTYPE html>")
    assert "<script>" in page and "src=" not in page and "https://" not in page
    assert "script-src 'sha256-" in headers["Content-Security-Policy"]
    for section in ("stages", "trials", "tree", "ledger", "verdict", "updated", "eta"):
        assert f'id="{section}"' in page


def test_other_hosts_and_paths_are_refused(tmp_path, serve):
    url = serve(tmp_path)
    assert get(url + "api/state", Host="attacker.example:8266")[0] == 403
    assert get(url + "api/state", Host="localhost:9000")[0] == 200  # an SSH tunnel
    assert get(url + "lineage.json")[0] == 404


def test_a_run_on_s3_is_served_from_the_bucket(serve, monkeypatch):
    """A real S3-protocol server on loopback (moto); dummy credentials and a
    dead loopback default endpoint, so nothing can reach AWS."""
    boto3 = pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {"AWS_ACCESS_KEY_ID": "testing",
                        "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1",
                        "AWS_EC2_METADATA_DISABLED": "true",
                        "AWS_CONFIG_FILE": os.devnull,
                        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
                        "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
                        "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9"}.items():
        monkeypatch.setenv(name, value)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0,
                                            verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        boto3.client("s3", endpoint_url=f"http://{host}:{port}").create_bucket(
            Bucket="runs")
        run = f"s3://runs/demo?endpoint_override={host}:{port}&scheme=http"
        storage.write_json(storage.resolve(run).join("lineage.json"),
                           {"run": "demo", "stages": [SEED]})
        url = serve(run)
        status, _, body = get(url + "api/state")
        state = json.loads(body)
        assert status == 200 and state["errors"] == []  # no live.json: not an error
        assert [(s["name"], s["status"]) for s in state["stages"]] == \
            [("seed", "done")]
        storage.write_json(storage.resolve(run).join("live.json"), live_file(
            {"seed": "done", "widen": "running"},
            [live_trial("widen", "widen_dense-lr0.001", "RUNNING", [.6])]))
        state = json.loads(get(url + "api/state")[2])
        assert [s["status"] for s in state["stages"]] == ["done", "running"]
    finally:
        server.stop()


def hears_ctrl_c() -> None:
    """In the child, before it runs: SIGINT back to its default. A test run
    started in the background of a shell without job control inherits
    SIGINT ignored, and so would every process it starts."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_the_command_prints_its_url_and_stops_on_ctrl_c(tmp_path):
    write(tmp_path, "lineage.json", {"run": "demo", "stages": [SEED]})
    proc = subprocess.Popen([sys.executable, "-m", "runner.cli", "dashboard",
                             str(tmp_path), "--port", "0"], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=hears_ctrl_c)
    try:
        line = proc.stdout.readline()
        url = line.split(": ", 1)[1].split()[0]
        assert url.startswith("http://127.0.0.1:") and url.endswith("/")
        assert json.loads(get(url + "api/state")[2])["stages"][0]["name"] == "seed"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "stopped" in out and "Traceback" not in err


def test_a_run_that_does_not_exist_is_one_line(tmp_path, capsys):
    assert main(["dashboard", str(tmp_path / "nope"), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"runner: error: {tmp_path / 'nope'}: no such run folder"


def dashboard_error(capsys, *argv) -> str:
    assert main(["dashboard", *map(str, argv)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("runner: error: ") and err.count("\n") == 1, err
    return err.strip().removeprefix("runner: error: ")


def test_a_port_out_of_range_is_one_line_naming_port(tmp_path, capsys):
    for port in ("99999", "-1"):
        assert dashboard_error(capsys, tmp_path, "--port", port) == \
            f"--port {port}: must be 0..65535 (0 picks a free one)"


def test_a_busy_port_is_one_line_naming_port(tmp_path, capsys):
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        err = dashboard_error(capsys, tmp_path, "--port", port)
    assert err.startswith(f"--port {port}: 127.0.0.1:{port} is already in use; "
                          "choose another --port")


def test_an_address_not_of_this_machine_is_one_line_naming_host(tmp_path, capsys):
    # 192.0.2.1 is reserved for documentation: no machine has it, nothing is sent
    err = dashboard_error(capsys, tmp_path, "--host", "192.0.2.1", "--port", 0)
    assert err.startswith("--host 192.0.2.1: cannot listen there")


def test_a_file_is_not_a_run_folder(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("x")
    with pytest.raises(RunnerError, match=f"^{notes}: is a file, not a run folder"):
        make_server(str(notes), "127.0.0.1", 0).server_close()


# --- in a real browser ---------------------------------------------------------------


def _find_chromium() -> str | None:
    if os.environ.get("RUNNER_CHROMIUM"):
        return os.environ["RUNNER_CHROMIUM"]
    names = ("chromium", "chromium-browser", "google-chrome-stable", "google-chrome")
    return next(filter(None, map(shutil.which, names)), None)


def _apt_install(package: str) -> str | None:
    """Install an OS package; None on success, else why not."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for argv in (["apt-get", "update"],
                 ["apt-get", "install", "-y", "--no-install-recommends", package]):
        done = subprocess.run(argv, env=env, capture_output=True, text=True,
                              check=False)
        if done.returncode:
            return f"{' '.join(argv)} failed: {done.stderr.strip()[-300:]}"
    return None


@pytest.fixture(scope="session")
def chromium():
    """The OS's Chromium: found, or installed from the OS packages when this
    is root on a machine with apt-get, or the browser tests skip."""
    path = _find_chromium()
    if path is None and hasattr(os, "geteuid") and os.geteuid() == 0 \
            and shutil.which("apt-get"):
        why = _apt_install("chromium")
        path = _find_chromium()
        if path is None:
            pytest.skip(f"Chromium could not be installed: "
                        f"{why or 'the package has no chromium on PATH'}")
    if path is None:
        pytest.skip("no Chromium on PATH (install the OS package `chromium`, or set "
                    "RUNNER_CHROMIUM); installing it needs root and apt-get")
    return path


@pytest.fixture(scope="session")
def browser(chromium):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    """A fresh page; the page's script errors and dialogs are collected in
    ``page.problems``."""
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    page = context.new_page()
    page.problems = []
    page.on("pageerror", lambda err: page.problems.append(f"script error: {err}"))
    page.on("dialog", lambda d: (page.problems.append(f"dialog: {d.message}"),
                                 d.dismiss()))
    yield page
    context.close()


def screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    return path


def row(trial: str, **attrs) -> str:
    more = "".join(f'[data-{k}="{v}"]' for k, v in attrs.items())
    return f'tr[data-trial="{trial}"]{more}'


def test_the_page_follows_hand_written_files_without_reloading(tmp_path, serve,
                                                                page):
    """The test plays the driver: it rewrites the files, the page catches up."""
    trial = "widen/widen_dense-lr0.001"
    write(tmp_path, "lineage.json", {"run": "demo", "stages": [SEED]})
    statuses = {"seed": "done", "widen": "running", "baseline": "pending"}
    write(tmp_path, "live.json", live_file(statuses, [
        live_trial("widen", EVIL, "TERMINATED", [.5]),
        live_trial("widen", "widen_dense-lr0.001", "RUNNING", [.66])]))
    page.goto(serve(tmp_path))
    page.wait_for_selector(row(trial, status="RUNNING", epoch=1))
    page.evaluate("window.sameDocument = true")
    assert "ago" in page.inner_text("#updated")
    assert page.locator('#stages li[data-stage="widen"][data-status="running"]').count()

    write(tmp_path, "live.json", live_file(statuses, [
        live_trial("widen", EVIL, "TERMINATED", [.5]),
        live_trial("widen", "widen_dense-lr0.001", "RUNNING", [.66, .7])]))
    page.wait_for_selector(row(trial, status="RUNNING", epoch=2))
    assert page.locator(row(trial)).locator("td").nth(2).inner_text() == "2 / 3"

    widen = stage_record(2, "widen", [record("widen_dense-lr0.001", "widen_dense",
                                             [.66, .7], 90),
                                      record(EVIL, "plain_copy", [.5], 90)],
                         "widen_dense-lr0.001", SEED)
    base = stage_record(3, "baseline", [record("scratch-lr0.001", "scratch",
                                               [.5, .6, .68], 60)], "scratch-lr0.001")
    write(tmp_path, "lineage.json", {"run": "demo", "stages": [SEED, widen],
                                     "baseline": base, "finished": True,
                                     "verdict": verdict([SEED, widen], base)})
    page.wait_for_selector('#run-state[data-state="finished"]')
    assert "growing reached" in page.inner_text("#verdict")
    assert page.locator("#tree .node.won").count() == 3
    assert page.evaluate("window.sameDocument") is True
    assert page.problems == []
    screenshot(page, "dashboard-finished.png")


# --- following a real growth run -----------------------------------------------------


def _session_pids(sid: int) -> list[int]:
    """Live processes of session ``sid``: the run and anything it started
    (Ray's); exited ones waiting to be reaped (zombies) do not count."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")[:100]
    except OSError:
        return ""


def _stop(proc: subprocess.Popen) -> list[str]:
    """Stop the run as Ctrl-C would (its Ray shuts down with it), then
    SIGTERM; give its session's processes 30 s to follow, and return those
    still alive after that ("pid command"), killed now."""
    for sig, grace in ((signal.SIGINT, 60), (signal.SIGTERM, 30)):
        if proc.poll() is not None:
            break
        proc.send_signal(sig)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            continue
    deadline = time.monotonic() + 30
    while _session_pids(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [pid for pid in _session_pids(proc.pid) if pid != proc.pid]
    named = [f"{pid} {_cmdline(pid)}" for pid in left]
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    return named


@dataclass
class GrowthRun:
    proc: subprocess.Popen
    root: Path
    log: Path
    left: list[str] | None = None  # what outlived the run, once it is stopped

    def stop(self) -> list[str]:
        if self.left is None:
            self.left = _stop(self.proc)
        return self.left


@pytest.fixture
def growth_run(tmp_path, cats_dogs_subset):
    """`runner grow` in a subprocess (its own session): one stage of four
    epochs on the small subset, 2 CPUs. Stopped after the test at the latest."""
    root, log_path = tmp_path / "run", tmp_path / "grow.log"
    root.mkdir()
    runner = Path(sys.executable).with_name("runner")
    argv = [str(runner), "grow", "jobs/cats_dogs.yaml"] + [
        a for s in (f"storage={root}", f"data.root={cats_dogs_subset}",
                    "stages=[{name: seed, model: classifier_1, epochs: 4}]",
                    "baseline=false", "train.batch_size=16", "ray.num_cpus=2")
        for a in ("--set", s)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=hears_ctrl_c)
    run = GrowthRun(proc, root, log_path)
    yield run
    run.stop()


def wait_for(page, run: GrowthRun, what: str, js: str, arg=None):
    """Poll the page (not reload it) until ``js`` returns something truthy;
    fail with the run's log if the run ends first. The generous limit only
    keeps a broken run from hanging the suite."""
    from playwright.sync_api import TimeoutError as PageTimeout
    deadline = time.monotonic() + 600
    while True:
        try:
            return page.wait_for_function(js, arg=arg, timeout=2000).json_value()
        except PageTimeout:
            ended = run.proc.poll() is not None
            if ended or time.monotonic() > deadline:
                why = f"the run ended, exit {run.proc.returncode}" if ended \
                    else "gave up"
                pytest.fail(f"never saw {what} ({why}); the run's log ends:\n"
                            f"{run.log.read_text()[-3000:]}")


FIND_RUNNING = """() => {
  const r = document.querySelector('tr[data-trial^="seed/"][data-status="RUNNING"]');
  return r && +r.dataset.epoch >= 1 ? {trial: r.dataset.trial, epoch: +r.dataset.epoch}
                                    : null;
}"""
FIND_LATER = """(seen) => {
  const r = [...document.querySelectorAll("tr[data-trial]")]
    .find(r => r.dataset.trial === seen.trial);
  return r && +r.dataset.epoch > seen.epoch ? +r.dataset.epoch : null;
}"""


def test_the_page_follows_a_real_growth_run(growth_run, serve, page):
    page.goto(serve(growth_run.root))
    page.evaluate("window.sameDocument = true")
    seen = wait_for(page, growth_run, "a running trial with an epoch", FIND_RUNNING)
    later = wait_for(page, growth_run, "a later epoch", FIND_LATER, seen)
    assert later > seen["epoch"]
    cell = page.locator(row(seen["trial"])).locator("td").nth(2).inner_text()
    assert int(cell.split(" / ")[0]) >= later  # the number is on screen
    assert page.evaluate("window.sameDocument") is True  # never reloaded
    assert page.problems == []
    assert "ago" in page.inner_text("#updated")
    screenshot(page, "dashboard-live.png")
    assert growth_run.stop() == [], "processes of the run outlived it"
    # Ctrl-C stops the run; the stage it cut short is not recorded as done,
    # so the same command resumes it.
    assert growth_run.proc.returncode == 130
    assert not (growth_run.root / "lineage.json").exists()
    live = json.loads((growth_run.root / "live.json").read_text())
    assert live["state"] == "interrupted"


def test_a_moved_run_folder_is_shown_with_its_own_paths(tmp_path):
    write(tmp_path, "lineage.json", {"run": "demo", "storage": "/runs/gone",
                                     "stages": [dict(SEED, checkpoint="/runs/gone/seed/x")],
                                     "finished": False})
    state = state_of(tmp_path)
    assert state["storage"] == str(tmp_path)
    assert state["stages"][0]["checkpoint"] == f"{tmp_path}/seed/x"
    assert "/runs/gone" not in json.dumps(state)

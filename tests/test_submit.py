"""`ray job submit` for real: a `ray start` head on 127.0.0.1 runs jobs/grow.py
from the uploaded project folder, and the run's lineage appears in storage.

The cluster is our own: its own ports and temp dir (so a plain ``ray.init()``
elsewhere does not find it through /tmp/ray/ray_current_cluster), and it is
stopped by signalling the ``ray start --block`` we launched. ``ray stop
--force`` is not used: it kills every Ray process on the machine, other
people's included. While it runs, a ``runner grow`` without an address in
another process on this machine sees it (runner.cluster looks for running
GCS processes), so the suite runs it after the in-process Ray tests.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).with_name("ray")
JOB = "jobs/cats_dogs.yaml"
START_TIMEOUT = 180  # s for the head to answer job requests on a busy 2-core box
SUBMIT_TIMEOUT = 480  # s: three 1-epoch, 1-trial stages took ~2.5 min here
STOP_TIMEOUT = 60  # s for `ray start --block` to take its processes down


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cluster_env(dashboard_port: int) -> dict:
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    env.pop("RAY_ADDRESS", None)
    # Ray Train frees a finished trial's CPUs through the state API, which
    # otherwise guesses the cluster; with another Ray on this machine it may
    # ask that one, and the next trial waits forever. Every process of our
    # cluster inherits this and asks ours.
    env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard_port}"
    # The job runs `python` from the head's PATH: this virtual environment's.
    env["PATH"] = f"{RAY.parent}{os.pathsep}{env.get('PATH', '')}"
    return env


# --- processes, through /proc (psutil is not a dependency) ----------------------


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def descendants(root: int) -> set[int]:
    parents = {pid: _ppid(pid) for pid in _pids()}
    found, frontier = set(), {root}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - found
        found |= frontier
    return found


def mentioning(text: str) -> set[int]:
    """Processes whose command line names ``text`` (our unique temp dir)."""
    found = set()
    for pid in _pids():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if text.encode() in cmdline and pid != os.getpid():
            found.add(pid)
    return found


def alive(pids) -> set[int]:
    out = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.add(pid)
    return out


# --- the head node ---------------------------------------------------------------


def wait_until_serving(proc, port: int, log: Path) -> None:
    """Until the dashboard answers the jobs API (any HTTP status will do)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"ray start exited {proc.returncode}:\n{log.read_text()}")
        try:
            opener.open(f"http://127.0.0.1:{port}/api/jobs/", timeout=5).close()
            return
        except urllib.error.HTTPError:
            return
        except (urllib.error.URLError, OSError):
            time.sleep(2)
    pytest.fail(f"the head did not serve jobs in {START_TIMEOUT}s:\n{log.read_text()}")


def stop(proc, temp_dir: str) -> set[int]:
    """Stop our cluster; return the pids that had to be killed afterwards."""
    ours = descendants(proc.pid) | mentioning(temp_dir)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # its handler stops what it started
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    # workers notice that their raylet is gone and exit on their own
    deadline = time.monotonic() + STOP_TIMEOUT
    while (left := alive(ours | mentioning(temp_dir))) and \
            time.monotonic() < deadline:
        time.sleep(1)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


@pytest.fixture(scope="module")
def ray_head():
    # A short path: Ray's Unix sockets live under it (108-byte limit).
    temp_dir = tempfile.mkdtemp(prefix="rs-", dir="/tmp")
    ports = {name: free_port() for name in ("gcs", "dashboard", "agent", "client")}
    log = Path(temp_dir) / "ray-start.log"
    cmd = [str(RAY), "start", "--head", "--block", "--num-cpus", "2",
           "--port", str(ports["gcs"]), "--temp-dir", temp_dir,
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(ports["dashboard"]),
           "--include-dashboard", "true",
           "--dashboard-agent-listen-port", str(ports["agent"]),
           "--ray-client-server-port", str(ports["client"])]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=cluster_env(ports["dashboard"]),
                                stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    head = {"ports": ports, "temp_dir": temp_dir, "log": log,
            "env": cluster_env(ports["dashboard"])}
    try:
        wait_until_serving(proc, ports["dashboard"], log)
        yield head
    finally:
        left = stop(proc, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not left, f"processes outlived `ray start --block`: {sorted(left)}"


AUTH_ANSWERS = ("Authentication required", "InvalidAuthToken")


def client(head: dict, cmd: list[str], timeout: float):
    """Run a Ray client command; once more with token auth if the head asks."""
    result = subprocess.run(cmd, cwd=ROOT, env=head["env"], capture_output=True,
                            text=True, timeout=timeout)
    said = result.stdout + result.stderr
    if "RAY_AUTH_MODE" not in head["env"] and any(a in said for a in AUTH_ANSWERS):
        # `ray start` turned token auth on; clients read ~/.ray/auth_token
        head["env"]["RAY_AUTH_MODE"] = "token"
        result = subprocess.run(cmd, cwd=ROOT, env=head["env"], capture_output=True,
                                text=True, timeout=timeout)
    return result


def submit(head: dict, argv: list[str]) -> subprocess.CompletedProcess:
    address = f"http://127.0.0.1:{head['ports']['dashboard']}"
    try:
        return client(head, [str(RAY), "job", "submit", "--address", address,
                             "--working-dir", ".", "--", *argv], SUBMIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the job ran past {SUBMIT_TIMEOUT}s\n{job_state(head)}")


def job_state(head: dict) -> str:
    """The job's last log lines and what the cluster was waiting for."""
    logs = Path(head["temp_dir"]) / "session_latest" / "logs"
    lines = []
    for name in ("job-driver-*.log", "monitor.log"):
        for path in sorted(logs.glob(name)):
            lines += path.read_text(errors="replace").splitlines()[-15:]
    return "\n".join(line[:300] for line in lines)


def node_addresses(head: dict) -> list[str]:
    code = ("import json, ray; ray.init(address='127.0.0.1:%d', logging_level='ERROR');"
            "print(json.dumps([n['NodeManagerAddress'] for n in ray.nodes()]))"
            % head["ports"]["gcs"])
    out = client(head, [sys.executable, "-c", code], timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def tiny_job(run: Path, data: Path) -> tuple[list[str], list[str]]:
    """``--set`` arguments that cut the shipped job to one epoch and one variant
    per stage and no baseline (so the test follows the job file as stages are
    added), and the stage names the lineage must then hold."""
    raw = yaml.safe_load((ROOT / JOB).read_text())
    sets = [f"storage={run}", f"data.root={data}", "train.batch_size=16"]
    for i, stage in enumerate(raw["stages"]):
        sets.append(f"stages.{i}.epochs=1")
        if len(stage.get("variants") or []) > 1:
            first = yaml.safe_dump(stage["variants"][:1], default_flow_style=True)
            sets.append(f"stages.{i}.variants={first.strip()}")
    if "baseline" in raw:
        sets.append("baseline=false")
    args = [a for pair in zip(["--set"] * len(sets), sets) for a in pair]
    return args, [stage["name"] for stage in raw["stages"]]


def test_ray_job_submit_runs_every_stage(ray_head, cats_dogs_subset, tmp_path):
    assert node_addresses(ray_head) == ["127.0.0.1"]
    run = tmp_path / "run"
    sets, names = tiny_job(run, cats_dogs_subset)
    result = submit(ray_head, ["python", "jobs/grow.py", JOB, *sets])
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "succeeded" in output

    lineage = json.loads((run / "lineage.json").read_text())
    assert lineage["finished"]
    assert [s["name"] for s in lineage["stages"]] == names
    for stage in lineage["stages"]:
        assert (Path(stage["checkpoint"]) / "model.pt").is_file()

    # What was uploaded: the project, without the virtual environment or runs.
    unpacked = Path(ray_head["temp_dir"]).glob(
        "session_*/runtime_resources/working_dir_files/_ray_pkg_*")
    packages = [p for p in unpacked if p.is_dir()]  # not the .zip.lock files
    assert packages, "no unpacked working dir found"
    for package in packages:
        assert (package / "jobs" / "grow.py").is_file()
        assert not (package / ".venv").exists() and not (package / "runs").exists()


def test_runner_grow_joins_the_running_cluster_with_no_auth_settings(
        ray_head, cats_dogs_subset, tmp_path):
    """`ray start --head`, then plain `runner grow`: it finds the one cluster
    on the machine and joins it, token auth and all, without RAY_ADDRESS or
    RAY_AUTH_MODE."""
    env = {k: v for k, v in ray_head["env"].items()
           if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    run = tmp_path / "run"
    sets = [f"storage={run}", f"data.root={cats_dogs_subset}", "baseline=false",
            "train.batch_size=16", "stages=[{name: seed, model: classifier_2, epochs: 1}]"]
    result = subprocess.run(
        [str(RAY.with_name("runner")), "grow", JOB,
         *[a for s in sets for a in ("--set", s)]],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=SUBMIT_TIMEOUT)
    assert result.returncode == 0, result.stderr[-4000:]
    gcs = f"127.0.0.1:{ray_head['ports']['gcs']}"
    assert f"joining the Ray cluster already running at {gcs}" in result.stderr
    assert json.loads((run / "lineage.json").read_text())["finished"]
    # The run's own progress lines, not Tune's experiment banner.
    said = result.stdout + result.stderr
    assert "epoch 1/1" in said and "Configuration for experiment" not in said

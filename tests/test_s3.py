"""Storage on S3, against a real S3-protocol server on loopback (moto in server
mode): round trips, ingest, a whole growth run on a real local Ray with its
root in the bucket and its resume, and the retries when the store fails.

Nothing here may leave the machine: the module's environment carries dummy
credentials, no instance metadata lookups, and an endpoint on a dead loopback
port (AWS_ENDPOINT_URL_S3), so a URI that lost its own endpoint on the way
fails on loopback instead of reaching AWS.
"""

import json
import logging
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import boto3
import pytest
from moto.server import ThreadedMotoServer

from runner import storage
from runner.cli import main
from runner.config import load_job
from runner.data.ingest import ingest, load_manifest
from runner.errors import RunnerError
from runner.evaluate import load_split

BUCKET = "runs"
DEAD_ENDPOINT = "http://127.0.0.1:9"  # discard port: nothing listens
ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
       "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
       "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
       "AWS_ENDPOINT_URL_S3": DEAD_ENDPOINT, "AWS_ENDPOINT_URL": DEAD_ENDPOINT}


@pytest.fixture(scope="module")
def aws_env():
    """Dummy credentials and loopback-only endpoints, for this module only."""
    patch = pytest.MonkeyPatch()
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION",
                 "RUNNER_STORAGE_ATTEMPTS", "RUNNER_STORAGE_RETRY_DELAY"):
        patch.delenv(name, raising=False)
    for name, value in ENV.items():
        patch.setenv(name, value)
    yield
    patch.undo()


def start_moto() -> tuple[ThreadedMotoServer, str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _, port = server.get_host_and_port()
    return server, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def s3(aws_env):
    """A moto S3 server on loopback with an empty bucket: its endpoint
    (HOST:PORT) and a boto3 client on it."""
    server, endpoint = start_moto()
    client = boto3.client("s3", endpoint_url=f"http://{endpoint}")
    client.create_bucket(Bucket=BUCKET)
    requests = logging.getLogger("werkzeug")  # moto's one line per request
    level = requests.level
    requests.setLevel(logging.WARNING)
    yield endpoint, client
    requests.setLevel(level)
    server.stop()


def uri(endpoint: str, key: str, bucket: str = BUCKET) -> str:
    """An S3 URI that carries its endpoint."""
    return f"s3://{bucket}/{key}?endpoint_override={endpoint}&scheme=http"


def keys(client, prefix: str) -> set[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET,
                                                               Prefix=prefix)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


@pytest.fixture
def quick_retries(monkeypatch):
    """Two attempts with a near-zero backoff."""
    monkeypatch.setenv("RUNNER_STORAGE_ATTEMPTS", "2")
    monkeypatch.setenv("RUNNER_STORAGE_RETRY_DELAY", "0.01")


def retry_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "runner.storage" and r.levelno == logging.WARNING]


# ------------------------------------------------------------- round trips


def test_json_is_written_whole_and_read_back(s3):
    endpoint, client = s3
    loc = storage.resolve(uri(endpoint, "json/lineage.json"))
    storage.write_json(loc, {"stages": [1, 2]})
    storage.write_json(loc, {"stages": [1, 2, 3]})
    assert storage.read_json(loc) == {"stages": [1, 2, 3]}
    # The temporary objects were renamed away: only the file (and the
    # folder marker pyarrow writes) remain.
    assert {k for k in keys(client, "json/") if not k.endswith("/")} == \
        {"json/lineage.json"}
    assert json.loads(client.get_object(Bucket=BUCKET, Key="json/lineage.json")
                      ["Body"].read()) == {"stages": [1, 2, 3]}


def test_folders_go_up_and_come_back_byte_for_byte(s3, tmp_path):
    endpoint, client = s3
    src = tmp_path / "ckpt"
    (src / "sub").mkdir(parents=True)
    (src / "model.pt").write_bytes(os.urandom(300_000))
    (src / "sub" / "meta.json").write_text('{"epoch": 1}')
    loc = storage.resolve(uri(endpoint, "dirs/epoch-001"))
    storage.upload_dir(str(src), loc)
    assert {"dirs/epoch-001/model.pt", "dirs/epoch-001/sub/meta.json"} <= \
        keys(client, "dirs/")
    assert storage.exists(loc.join("model.pt")) and storage.exists(loc)
    assert not storage.exists(loc.join("nothing-here"))
    back = storage.download_dir(loc, str(tmp_path / "back"))
    for rel in ("model.pt", "sub/meta.json"):
        assert (tmp_path / "back" / rel).read_bytes() == (src / rel).read_bytes()
    assert back == str(tmp_path / "back")


def test_a_folder_written_by_another_client_downloads(s3, tmp_path):
    # Ray Train and other S3 clients write no folder marker objects.
    endpoint, client = s3
    for key, body in (("raw/epoch-001/model.pt", b"weights"),
                      ("raw/epoch-001/sub/meta.json", b"{}")):
        client.put_object(Bucket=BUCKET, Key=key, Body=body)
    local = tmp_path / "not" / "yet" / "there"
    storage.download_dir(storage.resolve(uri(endpoint, "raw/epoch-001")), str(local))
    assert (local / "model.pt").read_bytes() == b"weights"
    assert (local / "sub" / "meta.json").read_bytes() == b"{}"


def test_a_writable_root_passes_the_probe_and_keeps_nothing_of_it(s3):
    endpoint, client = s3
    storage.check_writable(storage.resolve(uri(endpoint, "probe/run")))
    assert not [k for k in keys(client, "probe/") if "write-probe" in k]


def test_derived_locations_keep_the_endpoint_of_their_root(s3):
    endpoint, _ = s3
    root = storage.resolve(uri(endpoint, "derived/run"))
    ckpt = root.join("seed", "train", "t1", "epoch-001")
    assert ckpt.uri == uri(endpoint, "derived/run/seed/train/t1/epoch-001")
    assert ckpt.path == f"{BUCKET}/derived/run/seed/train/t1/epoch-001"
    assert ckpt.parent.uri == uri(endpoint, "derived/run/seed/train/t1")
    # A path as Ray reports it (on the filesystem, no scheme) becomes a URI
    # that another process can resolve on its own.
    assert storage.within(root, ckpt.path).uri == ckpt.uri
    storage.write_json(ckpt.join("meta.json"), {"epoch": 1})
    again = storage.resolve(storage.within(root, ckpt.path).join("meta.json").uri)
    assert storage.read_json(again) == {"epoch": 1}
    with pytest.raises(RunnerError, match="does not lie under"):
        storage.within(root, f"{BUCKET}/elsewhere/x")


def test_the_endpoint_can_come_from_the_environment(s3, monkeypatch):
    endpoint, client = s3
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://{endpoint}")
    loc = storage.resolve(f"s3://{BUCKET}/env/run/lineage.json")
    assert loc.uri == f"s3://{BUCKET}/env/run/lineage.json"
    storage.write_json(loc, {"ok": True})
    assert "env/run/lineage.json" in keys(client, "env/")
    assert storage.read_json(loc) == {"ok": True}


def test_ingest_writes_shards_to_the_bucket_and_they_load_back(s3, cats_dogs_subset):
    endpoint, client = s3
    out = uri(endpoint, "data")
    manifest = ingest(str(cats_dogs_subset), out, base_size=72, workers=1)
    assert manifest["counts"] == {"train": {"cats": 40, "dogs": 40},
                                  "test": {"cats": 20, "dogs": 20}}
    stored = keys(client, "data/")
    assert "data/manifest.json" in stored
    for rel in manifest["shards"]["train"] + manifest["shards"]["test"]:
        assert f"data/{rel}" in stored
    loaded = load_manifest(out)
    assert loaded["fingerprint"] == manifest["fingerprint"]
    pixels, labels = load_split(dict(loaded, location=out), "test")
    assert pixels.shape == (40, 72, 72, 3) and sorted(set(labels)) == [0, 1]
    assert ingest(str(cats_dogs_subset), out, base_size=72, workers=1)["reused"]


# ------------------------------------------------------------------ failures


def test_a_missing_file_is_named_at_once_without_retries(s3, caplog):
    endpoint, _ = s3
    loc = storage.resolve(uri(endpoint, "missing/lineage.json"))
    with caplog.at_level(logging.WARNING), \
            pytest.raises(RunnerError, match="missing/lineage.json.*no such file"):
        storage.read_json(loc)
    assert retry_warnings(caplog) == []


def test_a_bucket_that_does_not_exist_is_refused_without_retries(s3, caplog):
    endpoint, _ = s3
    loc = storage.resolve(uri(endpoint, "run", bucket="no-such-bucket"))
    with caplog.at_level(logging.WARNING), \
            pytest.raises(RunnerError, match="storage root s3://no-such-bucket/run"
                                             r"\?.* is not writable"):
        storage.check_writable(loc)
    assert retry_warnings(caplog) == []


def test_a_stopped_server_is_retried_then_named(aws_env, quick_retries, caplog):
    server, endpoint = start_moto()
    boto3.client("s3", endpoint_url=f"http://{endpoint}").create_bucket(Bucket=BUCKET)
    loc = storage.resolve(uri(endpoint, "gone/lineage.json"))
    storage.write_json(loc, {"stages": []})
    server.stop()  # the port now refuses connections
    with caplog.at_level(logging.WARNING), pytest.raises(RunnerError) as err:
        storage.write_json(loc, {"stages": [1]})
    assert str(err.value).startswith(
        f"storage: could not write {loc.uri} after 2 attempts: ")
    assert "NETWORK_CONNECTION" in str(err.value)
    (warning,) = retry_warnings(caplog)
    assert warning.startswith(f"storage: write {loc.uri} failed (attempt 1 of 2)")


class _Answer(BaseHTTPRequestHandler):
    """Every request gets the same S3 error (class attributes set per server)."""

    status, code = 503, "SlowDown"

    def _answer(self):
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        body = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{self.code}"
                f"</Code><Message>{self.code}</Message></Error>").encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _answer

    def log_message(self, *args):
        pass


@pytest.fixture
def failing_store():
    """An HTTP server on loopback that answers every S3 call with an error;
    call it with (status, code) to get its endpoint."""
    servers = []

    def start(status: int, code: str) -> str:
        handler = type("Handler", (_Answer,), {"status": status, "code": code})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"127.0.0.1:{server.server_address[1]}"
    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_slow_down_is_retried_then_named(aws_env, quick_retries, failing_store,
                                         caplog):
    loc = storage.resolve(uri(failing_store(503, "SlowDown"), "busy/lineage.json"))
    with caplog.at_level(logging.WARNING), \
            pytest.raises(RunnerError, match=r"storage: could not write "
                                             r"s3://runs/busy/lineage.json\?.* after "
                                             r"2 attempts: .*(503|SLOW_DOWN)"):
        storage.write_json(loc, {})
    assert len(retry_warnings(caplog)) == 1


def test_access_denied_is_not_retried(aws_env, quick_retries, failing_store, caplog):
    loc = storage.resolve(uri(failing_store(403, "AccessDenied"), "locked/run"))
    with caplog.at_level(logging.WARNING), \
            pytest.raises(RunnerError, match="not writable: .*ACCESS_DENIED"):
        storage.check_writable(loc)
    assert retry_warnings(caplog) == []


def test_a_silent_endpoint_times_out_instead_of_hanging(aws_env, monkeypatch):
    monkeypatch.setenv("RUNNER_STORAGE_ATTEMPTS", "1")
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)  # connections are accepted by the kernel, never answered
    try:
        port = silent.getsockname()[1]
        loc = storage.resolve(uri(f"127.0.0.1:{port}", "run")
                              + "&connect_timeout=1&request_timeout=1")
        with pytest.raises(RunnerError, match="could not look up .* after 1 attempt: "
                                              ".*Timeout"):
            storage.exists(loc)
    finally:
        silent.close()


def test_s3_filesystems_get_timeouts(aws_env):
    def options(loc):
        return loc.fs.__reduce__()[1][0]
    plain = options(storage.resolve(f"s3://{BUCKET}/run"))
    assert (plain["connect_timeout"], plain["request_timeout"]) == \
        (storage.CONNECT_TIMEOUT_S, storage.REQUEST_TIMEOUT_S)
    given = options(storage.resolve(f"s3://{BUCKET}/run?request_timeout=9"))
    assert given["request_timeout"] == 9.0


def test_bad_retry_settings_are_named(aws_env, monkeypatch, tmp_path):
    monkeypatch.setenv("RUNNER_STORAGE_ATTEMPTS", "0")
    with pytest.raises(RunnerError, match="RUNNER_STORAGE_ATTEMPTS='0'"):
        storage.exists(storage.resolve(str(tmp_path)))


# ------------------------------------------------- a growth run in the bucket


def s3_job(endpoint: str, data):
    """Two one-epoch stages (one trial each), no baseline, 2 CPUs."""
    return load_job("jobs/cats_dogs.yaml", [
        f"storage={uri(endpoint, 'grow')}", f"data.root={data}",
        "train.batch_size=16", "ray.num_cpus=2", "baseline=false",
        ("stages=[{name: seed, model: classifier_1, epochs: 1},"
         " {name: deepen, epochs: 1, variants: [{op: deepen_block}]}]")])


@pytest.fixture(scope="module")
def s3_run(s3, cats_dogs_subset):
    """The job grown with its storage root in the bucket; Ray is started by
    the run (``runner.cluster.connect``) and shut down after the module."""
    import ray

    from runner.growth.loop import grow

    endpoint, _ = s3
    try:
        yield endpoint, grow(s3_job(endpoint, cats_dogs_subset))
    finally:
        ray.shutdown()


def test_a_run_keeps_its_lineage_checkpoints_and_tune_results_in_the_bucket(
        s3, s3_run):
    _, client = s3
    endpoint, lineage = s3_run
    stored = keys(client, "grow/")
    assert {"grow/lineage.json", "grow/job.yaml", "grow/data/manifest.json"} <= stored
    root = storage.resolve(uri(endpoint, "grow"))
    assert storage.read_json(root.join("lineage.json")) == \
        json.loads(json.dumps(lineage))
    assert [s["name"] for s in lineage["stages"]] == ["seed", "deepen"]
    for stage in lineage["stages"]:
        # Checkpoints are recorded as URIs any process can resolve.
        ckpt = storage.resolve(stage["checkpoint"])
        assert stage["checkpoint"].startswith(f"s3://{BUCKET}/grow/{stage['name']}/")
        assert ckpt.uri.endswith(f"?endpoint_override={endpoint}&scheme=http")
        prefix = ckpt.path.removeprefix(f"{BUCKET}/") + "/"
        assert {prefix + f for f in ("model.pt", "spec.json", "meta.json")} <= stored
        # Tune's own records of the stage.
        assert any(k.startswith(f"grow/{stage['name']}/") and
                   k.endswith("tuner.pkl") for k in stored)
        assert any(k.startswith(f"grow/{stage['name']}/") and
                   k.endswith("result.json") for k in stored)
        assert stage["test"]["images"] == 40
    deepen = lineage["stages"][1]
    assert deepen["parent"]["checkpoint"] == lineage["stages"][0]["checkpoint"]
    assert any(k.startswith("grow/deepen/init/") and k.endswith("model.pt")
               for k in stored)


def test_report_reads_the_run_from_the_bucket(s3_run, capsys):
    endpoint, lineage = s3_run
    assert main(["report", uri(endpoint, "grow")]) == 0
    out = capsys.readouterr().out
    for stage in lineage["stages"]:
        assert f"winner {stage['winner']}" in out


def test_rerunning_trains_nothing_and_a_lost_stage_is_restored_from_tune(
        s3, s3_run, cats_dogs_subset, caplog):
    from runner.growth.loop import grow

    _, client = s3
    endpoint, lineage = s3_run
    before = keys(client, "grow/deepen/train/")
    with caplog.at_level(logging.INFO):
        again = grow(s3_job(endpoint, cats_dogs_subset))
    assert again["stages"] == json.loads(json.dumps(lineage["stages"]))
    assert "stage 1/2 (seed) already done" in caplog.text
    assert "stage 2/2 (deepen) already done" in caplog.text

    # Drop the last stage from the lineage: the rerun runs only that stage,
    # and Tune restores it from its records in the bucket, training nothing.
    path = storage.resolve(uri(endpoint, "grow/lineage.json"))
    partial = storage.read_json(path)
    partial["stages"] = partial["stages"][:1]
    partial["finished"] = False
    storage.write_json(path, partial)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        resumed = grow(s3_job(endpoint, cats_dogs_subset))
    assert "stage 1/2 (seed) already done" in caplog.text
    assert "resuming stage deepen" in caplog.text
    assert keys(client, "grow/deepen/train/") == before
    seed, deepen = resumed["stages"]
    old = lineage["stages"][1]
    assert seed == json.loads(json.dumps(lineage["stages"][0]))
    assert (deepen["winner"], deepen["checkpoint"], deepen["val_acc"]) == \
        (old["winner"], old["checkpoint"], old["val_acc"])
    assert resumed["finished"]

"""`diffseg submit/status/logs/stop/list` against a real Ray head with token authentication.

The head is ``ray start --head --block`` on 127.0.0.1 with its own ports, temp dir and
HOME (its token lives there, never in the user's ~/.ray), started once for this module.
It runs in a new session, so shutting it down is a signal to that session's process
group (every Ray process it started, workers included); we never run ``ray stop``,
which would stop every other Ray instance on the machine too. Nothing here calls
``ray.init``: the tests talk to the head through the job server only.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from jobs import cli
from jobs.connect import connect
from jobs.run import SUMMARY_PREFIX
from pipeline_helpers import make_photo_folder, read_output
from ray_processes import free_ports, stop_group

PORT_FLAGS = (
    "--port", "--dashboard-port", "--ray-client-server-port", "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port", "--node-manager-port", "--object-manager-port", "--runtime-env-agent-port",
    "--metrics-export-port",
)


@dataclass
class Head:
    address: str  # http://127.0.0.1:PORT, the job server
    home: Path  # HOME of the head (its token is home/.ray/auth_token, its model cache home/.cache)
    token_path: Path
    root: Path  # everything the head wrote; removed at shutdown
    process: subprocess.Popen
    log: Path

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def start_head(num_cpus: int = 2, timeout_s: float = 180.0) -> Head:
    # Short path: Ray's unix sockets live under it (108-byte limit).
    root = Path(tempfile.mkdtemp(prefix="dsj-", dir="/tmp"))
    home = root / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "DIFFSEG_CACHE"))}
    env.update(HOME=str(home), RAY_AUTH_MODE="token", HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0")
    ray_cli = [sys.executable, "-m", "ray.scripts.scripts"]
    subprocess.run([*ray_cli, "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=120)
    token_path = home / ".ray" / "auth_token"
    assert token_path.is_file()
    ports = free_ports(len(PORT_FLAGS))
    args = [*ray_cli, "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
            "--dashboard-host", "127.0.0.1", "--include-dashboard", "true", "--num-cpus", str(num_cpus),
            "--num-gpus", "0", "--temp-dir", str(root / "ray"), "--min-worker-port", "0", "--max-worker-port", "0",
            "--object-store-memory", str(300 * 2**20), "--disable-usage-stats"]
    for flag, port in zip(PORT_FLAGS, ports):
        args += [flag, str(port)]
    log = root / "head.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                   cwd=str(root))
    head = Head(f"http://127.0.0.1:{ports[1]}", home, token_path, root, process, log)
    try:
        _wait_ready(head, timeout_s)
    except BaseException:
        stop_head(head)
        raise
    return head


def _wait_ready(head: Head, timeout_s: float) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    token = head.token_path.read_text().strip()
    while True:
        if head.process.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.process.returncode}:\n{head.log_tail()}")
        try:
            req = urllib.request.Request(f"{head.address}/api/jobs/", headers={"Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(req, timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the Ray head's job server did not answer within {timeout_s:.0f} s:\n{head.log_tail()}")
        time.sleep(1.0)


def stop_head(head: Head, grace_s: float = 5.0) -> None:
    """SIGTERM the head's process group, SIGKILL what is left after ``grace_s``, remove its files."""
    stop_group(head.process, grace_s)
    shutil.rmtree(head.root, ignore_errors=True)


# ------------------------------------------------------------------------------ tests


pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:ssl=None is deprecated:DeprecationWarning")]
JOB_DEADLINE_S = 300.0  # generous: CI has 2 shared cores; nothing here asserts a duration
FAST = "model: {name: tiny-random, image_size: 64}\nmethod: {num_points: 4}\nresources: {batch_size: 4}\n"


@pytest.fixture(scope="module")
def head():
    h = start_head()
    try:
        yield h
    finally:
        stop_head(h)


@pytest.fixture
def with_token(head, monkeypatch):
    """This test's environment holds the head's token the way Ray documents: RAY_AUTH_TOKEN_PATH."""
    for name in ("RAY_AUTH_TOKEN", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(head.token_path))
    return head


def spec_file(folder: Path, name: str, input: Path, output: Path | str, extra: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(f"name: {name}\ninput: {input}\noutput: {output}\n{FAST}{extra}"
                    "runtime_env: {env_vars: {HF_HUB_OFFLINE: '1'}}\n")
    return path


def wait_status(head: Head, job_id: str, wanted: set[str], deadline_s: float = JOB_DEADLINE_S) -> str:
    cluster = connect(head.address)
    deadline = time.monotonic() + deadline_s
    while True:
        status = str(cluster.client.get_job_status(job_id).value)
        if status in wanted:
            return status
        if time.monotonic() > deadline:
            logs = cluster.client.get_job_logs(job_id)[-3000:]
            raise AssertionError(f"{job_id} still {status} after {deadline_s:.0f} s, not {wanted}:\n{logs}")
        time.sleep(1.0)


def job_summary(logs: str) -> dict:
    """The summary line that ``python -m jobs.run`` prints last."""
    line = next(x for x in reversed(logs.splitlines()) if x.startswith(SUMMARY_PREFIX))
    return json.loads(line[len(SUMMARY_PREFIX):])


def submitted_id(out: str) -> str:
    return out.strip().splitlines()[0]


def test_without_the_token_the_user_gets_one_sentence(head, tmp_path, monkeypatch, capsys):
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token here
    spec = spec_file(tmp_path, "no-token", tmp_path / "in", tmp_path / "out")
    assert cli.main(["submit", str(spec), "--address", head.address]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert err.startswith(f"diffseg submit: error: The Ray cluster at {head.address} requires an authentication "
                          "token and none was found: set RAY_AUTH_TOKEN")
    # a wrong token is told apart from a missing one, and its value is never shown
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token-0123456789")
    assert cli.main(["list", "--address", head.address]) == 2
    err = capsys.readouterr().err.strip()
    assert "rejected the authentication token from RAY_AUTH_TOKEN" in err and "not-the-token" not in err


def test_submit_wait_succeeds_and_writes_parquet(with_token, tmp_path, capsys, monkeypatch):
    ids = make_photo_folder(tmp_path / "in")
    spec = spec_file(tmp_path, "small", tmp_path / "in", tmp_path / "out")
    code = cli.main(["submit", str(spec), "--address", with_token.address, "--wait"])
    captured = capsys.readouterr()
    job_id = submitted_id(captured.out)
    assert code == 0, captured.err[-3000:]
    assert job_id.startswith("diffseg-small-") and job_id.endswith("-1")
    assert f"{job_id}: SUCCEEDED" in captured.err
    table = read_output(str(tmp_path / "out"))
    assert sorted(table.column("image_id").to_pylist()) == ids
    assert table.column("error").null_count == len(ids) and min(table.column("num_segments").to_pylist()) >= 1
    summary = job_summary(captured.out)
    assert summary["labelled"] == len(ids) and summary["complete"]
    # status, logs and list see it too (address from RAY_ADDRESS this time)
    monkeypatch.setenv("RAY_ADDRESS", with_token.address)
    assert cli.main(["status", job_id]) == 0
    assert capsys.readouterr().out.startswith(f"{job_id}: SUCCEEDED")
    assert cli.main(["logs", job_id]) == 0
    assert job_summary(capsys.readouterr().out)["labelled"] == 3
    assert cli.main(["list"]) == 0
    listing = capsys.readouterr().out
    assert job_id in listing and str(tmp_path / "out") in listing


def test_missing_input_ends_failed_with_the_error_in_its_logs(with_token, tmp_path, capsys):
    spec = spec_file(tmp_path, "missing-input", tmp_path / "does-not-exist", tmp_path / "out")
    assert cli.main(["submit", str(spec), "--address", with_token.address, "--wait"]) == 1
    captured = capsys.readouterr()
    job_id = submitted_id(captured.out)
    assert f"{job_id}: FAILED" in captured.err
    logs = connect(with_token.address).client.get_job_logs(job_id)
    assert "diffseg job: error: No input matched" in logs and str(tmp_path / "does-not-exist") in logs


def test_bad_spec_is_refused_before_submission(with_token, tmp_path, capsys):
    cluster = connect(with_token.address)
    before = {j.submission_id for j in cluster.client.list_jobs()}
    spec = spec_file(tmp_path, "bad", tmp_path / "in", tmp_path / "out", extra="io: {rows_per_file: many}\n")
    assert cli.main(["submit", str(spec), "--address", with_token.address]) == 2
    assert capsys.readouterr().err.strip() == (
        f"diffseg submit: error: {spec}: io.rows_per_file: must be an integer, not str 'many'.")
    assert {j.submission_id for j in cluster.client.list_jobs()} == before


def test_running_job_is_stopped_and_resubmitting_resumes_it(with_token, tmp_path, capsys):
    ids = make_photo_folder(tmp_path / "in", copies=100)  # 300 images, 75 shards of 4
    out = tmp_path / "out"
    spec = spec_file(tmp_path, "long", tmp_path / "in", out, extra="io: {rows_per_file: 4}\n")
    assert cli.main(["submit", str(spec), "--address", with_token.address]) == 0
    first = submitted_id(capsys.readouterr().out)
    assert first.endswith("-1")
    wait_status(with_token, first, {"RUNNING"})

    # while it runs: the same spec, or another spec writing the same output, is refused
    assert cli.main(["submit", str(spec), "--address", with_token.address]) == 2
    assert f"Job {first} of this spec is still RUNNING" in capsys.readouterr().err
    other = spec_file(tmp_path / "other", "other", tmp_path / "in", f"{out}/")  # same place, spelt differently
    assert cli.main(["submit", str(other), "--address", with_token.address]) == 2
    assert f"Job {first} (RUNNING) already writes to {out}/" in capsys.readouterr().err

    # stop it once some shards are committed, so the next attempt has something to skip
    deadline = time.monotonic() + JOB_DEADLINE_S
    while not list((out / "_done").glob("*.json")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert cli.main(["stop", first, "--address", with_token.address, "--wait"]) == 0
    assert f"{first}: STOPPED" in capsys.readouterr().out
    committed = len(list((out / "_done").glob("*.json")))
    assert 1 <= committed < 75

    assert cli.main(["submit", str(spec), "--address", with_token.address, "--wait"]) == 0
    captured = capsys.readouterr()
    second = submitted_id(captured.out)
    assert second == first[:-1] + "2"
    assert f"earlier attempt: {first} STOPPED (resumes its output)" in captured.err
    summary = job_summary(captured.out)
    assert summary["complete"] and summary["images"] == len(ids) == 300
    assert summary["shards"]["skipped_already_done"] >= committed
    assert summary["this_run"]["images"] <= len(ids) - 4 * committed
    assert sorted(read_output(str(out)).column("image_id").to_pylist()) == ids


def test_submit_parts_runs_n_jobs_on_one_output_each_image_once(with_token, tmp_path, capsys):
    """``submit --parts 2 --wait``: two jobs at once on the head, one output; then the same again
    finds every part done. Each part's model actor takes half a CPU: both jobs fit on 2 CPUs."""
    import pyarrow.parquet as pq

    ids = sorted(make_photo_folder(tmp_path / "in", copies=2))
    out = tmp_path / "out"
    spec = tmp_path / "parts.yaml"
    spec.write_text(f"name: parts\ninput: {tmp_path / 'in'}\noutput: {out}\n"
                    "model: {name: tiny-random, image_size: 64}\nmethod: {num_points: 4}\n"
                    "resources: {batch_size: 4, actors: 1, cpus_per_actor: 0.5}\nio: {rows_per_file: 2}\n"
                    "runtime_env: {env_vars: {HF_HUB_OFFLINE: '1'}}\n")
    code = cli.main(["submit", str(spec), "--parts", "2", "--address", with_token.address])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    jobs = captured.out.split()
    assert [j.rsplit("-", 2)[0] for j in jobs] == ["diffseg-parts-part-1-of-2", "diffseg-parts-part-2-of-2"]
    # both at once; a third job writing one of their parts, or the whole output, is refused meanwhile
    assert cli.main(["submit", str(spec), "--parts", "2", "--address", with_token.address]) == 2
    assert f"Job {jobs[0]} of this spec is still" in capsys.readouterr().err
    assert cli.main(["submit", str(spec), "--address", with_token.address]) == 2  # the whole output, no --part
    assert f"already writes to {out}; two jobs must not write one output at once" in capsys.readouterr().err
    for job in jobs:  # with a deadline (submit --wait, below, waits as long as the jobs take)
        assert wait_status(with_token, job, {"SUCCEEDED", "FAILED", "STOPPED"}) == "SUCCEEDED", \
            connect(with_token.address).client.get_job_logs(job)[-3000:]
    assert sorted(pq.read_table(out, columns=["image_id"]).column(0).to_pylist()) == ids
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["parts"]["status"] == {"1/2": "complete",
                                                                               "2/2": "complete"}
    cluster = connect(with_token.address)
    summaries = [job_summary(cluster.client.get_job_logs(j)) for j in jobs]
    assert [s["part"] for s in summaries] == ["1/2", "2/2"]
    assert sum(s["this_run"]["images"] for s in summaries) == len(ids)
    # submitted again: each part resumes its output and finds nothing left
    assert cli.main(["submit", str(spec), "--parts", "2", "--address", with_token.address, "--wait"]) == 0
    again = capsys.readouterr().out.split()
    assert [j.rsplit("-", 1)[1] for j in again] == ["2", "2"]  # second attempts of the same parts
    assert all(job_summary(cluster.client.get_job_logs(j))["this_run"]["images"] == 0 for j in again)
    assert sorted(pq.read_table(out, columns=["image_id"]).column(0).to_pylist()) == ids

"""Two Ray nodes on this machine: the head (driver, CPU tasks) and a model node (custom resource
``labeler``, so the model actors run there). Its raylet is killed mid-run and started again:
the run, or its rerun, ends with every image exactly once and every file readable.

Each ``ray start --block`` runs in its own session with its own temp dir and ports; shutting
a node down is a signal to its process group (never ``ray stop``, which would stop every
other Ray on the machine). Both are shut down whatever happens.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline_helpers import make_photo_folder, read_output
from ray_processes import free_ports, group_members, stop_group

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]
NODE_PORT_FLAGS = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                   "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port")


class Node:
    """One ``ray start --block`` process group (head or worker node)."""

    def __init__(self, root: Path, name: str, args: list[str], env: dict[str, str]):
        self.log = root / f"{name}.log"
        temp = root / name
        temp.mkdir(exist_ok=True)
        ports = free_ports(len(NODE_PORT_FLAGS))
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--node-ip-address", "127.0.0.1",
               "--temp-dir", str(temp), "--min-worker-port", "0", "--max-worker-port", "0",
               "--disable-usage-stats", *args]
        for flag, port in zip(NODE_PORT_FLAGS, ports):
            cmd += [flag, str(port)]
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True, cwd=str(root))

    def raylet_pid(self) -> int | None:
        return next((pid for pid, cmd in group_members(self.process.pid).items() if "/raylet" in cmd.split()[0]),
                    None)

    def tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def stop(self) -> None:
        stop_group(self.process)


def _wait_for_nodes(address: str, n: int, env: dict[str, str], nodes: list[Node], timeout_s: float = 240) -> None:
    probe = ("import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); "
             "print(sum(1 for x in ray.nodes() if x['Alive']))")
    deadline = time.monotonic() + timeout_s
    while True:
        for node in nodes:
            if node.process.poll() is not None:
                raise RuntimeError(f"a Ray node exited with {node.process.returncode}:\n{node.tail()}")
        try:  # a probe can hang in its connect on a loaded machine: it is retried until the deadline
            done = subprocess.run([sys.executable, "-c", probe, address], env=env, capture_output=True, text=True,
                                  timeout=max(10.0, min(90.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            done = None
        if done is not None and done.returncode == 0 and done.stdout.strip().splitlines()[-1:] == [str(n)]:
            return
        if time.monotonic() > deadline:
            said = done.stderr[-2000:] if done is not None else "(the last probe's connect did not return)"
            raise RuntimeError(f"{n} Ray nodes not up in {timeout_s:.0f} s:\n{said}")
        time.sleep(2.0)


@pytest.fixture
def cluster():
    root = Path(tempfile.mkdtemp(prefix="dsc-", dir="/tmp"))  # short: Ray's unix sockets live under it
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # RAY_memory_monitor_refresh_ms=0: Ray's OOM killer off, so that memory used by other programs
    # on a shared machine does not kill this test's workers (a node loss is what is tested here).
    env.update(RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0",
               RAY_memory_monitor_refresh_ms="0", PYTHONPATH=str(REPO), HOME=str(root))
    gcs_port, client_port = free_ports(2)
    address = f"127.0.0.1:{gcs_port}"
    nodes: list[Node] = []
    model_node_args = ["--address", address, "--num-cpus", "2", "--num-gpus", "0",
                       "--resources", json.dumps({"labeler": 2}), "--object-store-memory", str(200 * 2**20)]

    def start_model_node() -> Node:
        node = Node(root, f"model-node-{len(nodes)}", model_node_args, env)
        nodes.append(node)
        return node

    try:
        nodes.append(Node(root, "head", ["--head", "--port", str(gcs_port), "--ray-client-server-port",
                                         str(client_port), "--include-dashboard", "false", "--num-cpus", "1",
                                         "--num-gpus", "0", "--object-store-memory", str(200 * 2**20)], env))
        _wait_for_nodes(address, 1, env, nodes)
        start_model_node()
        _wait_for_nodes(address, 2, env, nodes)
        yield {"address": address, "env": env, "nodes": nodes, "start_model_node": start_model_node,
               "wait_for_nodes": lambda n: _wait_for_nodes(address, n, env, [x for x in nodes
                                                                             if x.process.poll() is None])}
    finally:
        for node in reversed(nodes):
            node.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_a_lost_model_node_costs_nothing_but_time(cluster, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    ids = make_photo_folder(src, copies=34)  # 102 images, 26 shards of 4
    cmd = [sys.executable, "-m", "pipeline", "label", str(src), str(out), "--model", "tiny-random",
           "--image-size", "64", "--num-points", "4", "--batch-size", "2", "--rows-per-file", "4",
           "--actors", "1", "--actor-resources", json.dumps({"labeler": 1}), "--ray-address", cluster["address"],
           "--json"]
    model_node = cluster["nodes"][1]
    log = tmp_path / "driver.log"
    with open(log, "wb") as driver_log:
        driver = subprocess.Popen(cmd, cwd=REPO, env=cluster["env"], stdout=subprocess.PIPE,
                                  stderr=driver_log, start_new_session=True, text=True)
    try:
        deadline = time.monotonic() + 1200
        while driver.poll() is None and time.monotonic() < deadline:
            if (out / "_done").exists() and len(list((out / "_done").glob("*.json"))) >= 3:
                break
            time.sleep(0.1)
        committed_at_kill = len(list((out / "_done").glob("*.json"))) if (out / "_done").exists() else 0
        raylet = model_node.raylet_pid()
        assert driver.poll() is None and raylet, f"nothing to kill: {log.read_text()[-3000:]}"
        os.kill(raylet, signal.SIGKILL)  # the model node is lost: its actor, tasks and objects with it
        model_node.process.wait(timeout=60)
        cluster["start_model_node"]()  # and it comes back
        cluster["wait_for_nodes"](2)
        stdout, _ = driver.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if driver.poll() is None:
            stop_group(driver)
    assert committed_at_kill < 26, "the node was killed after the run had committed everything"
    print(f"model node killed with {committed_at_kill} of 26 shards committed; the run exited {driver.returncode}")
    if driver.returncode != 0:  # the run may give up on lost work: its rerun must finish it
        err = log.read_text(errors="replace")
        assert "Traceback" not in err.split("diffseg label: error:")[-1], err[-3000:]
        rerun = subprocess.run(cmd, cwd=REPO, env=cluster["env"], capture_output=True, text=True, timeout=900)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        stdout = rerun.stdout
    start = stdout.index("{\n") if stdout.startswith("{\n") else stdout.index("\n{\n") + 1  # Ray logs around it
    summary, _ = json.JSONDecoder().raw_decode(stdout, start)
    assert summary["complete"] and summary["images"] == len(ids) == summary["labelled"]
    table = read_output(str(out))
    got = table.column("image_id").to_pylist()
    assert len(got) == len(set(got)) and sorted(got) == ids
    for part in out.glob("labels-*.parquet"):
        assert pq.read_table(part).num_rows <= 4
    left = sorted(str(p.relative_to(out)) for p in (out / "_inprogress").rglob("*")) if (out / "_inprogress").exists() else []
    assert not (out / "_inprogress").exists(), f"spill left behind: {left}"  # a re-run task's too (Committer.finish)

"""Ray is started locally unless a cluster is asked for, and a dead cluster is one sentence in seconds."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.ray_connect import RayConnectError, check_reachable, resolve_address
from ray_processes import free_ports

REPO = Path(__file__).resolve().parents[1]
PHOTOS = REPO / "examples" / "images"  # the quick start itself: tests/test_quick_start.py


@pytest.mark.parametrize("given, env, expected", [
    (None, {}, "local"),
    (None, {"RAY_ADDRESS": ""}, "local"),
    (None, {"RAY_ADDRESS": "local"}, "local"),
    (None, {"RAY_ADDRESS": "10.0.0.5:6379"}, "10.0.0.5:6379"),  # a submitted job's entrypoint
    (None, {"RAY_ADDRESS": "http://127.0.0.1:8265"}, "local"),  # for diffseg submit, not for ray.init
    ("local", {"RAY_ADDRESS": "10.0.0.5:6379"}, "local"),
    ("10.0.0.7:6380", {"RAY_ADDRESS": "10.0.0.5:6379"}, "10.0.0.7:6380"),
    ("ray://head:10001", {}, "ray://head:10001"),
])
def test_the_address_ray_starts_with(given, env, expected):
    where = resolve_address(given, env)
    assert where.address == expected
    assert where.joins == (expected != "local")
    if env.get("RAY_ADDRESS", "").startswith("http"):
        assert where.note and "job-server address (for `diffseg submit`)" in where.note


@pytest.mark.parametrize("given, says", [
    ("http://127.0.0.1:8265", "is a job-server address (for `diffseg submit`)"),
    ("  ", "--ray-address is empty"),
])
def test_a_wrong_kind_of_address_is_one_sentence(given, says):
    with pytest.raises(RayConnectError, match=None) as info:
        resolve_address(given, {})
    assert says in str(info.value) and "\n" not in str(info.value)


def test_an_unreachable_address_fails_fast_with_the_address_in_the_sentence():
    (port,) = free_ports(1)
    with pytest.raises(RayConnectError) as info:
        check_reachable(f"127.0.0.1:{port}", timeout_s=2)
    text = str(info.value)
    assert f"127.0.0.1:{port}" in text and "ray start --head" in text and "\n" not in text
    with pytest.raises(RayConnectError, match="is not HOST:PORT"):
        check_reachable("nonsense")


def _diffseg(args: list[str], env: dict[str, str], timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _env(ray_dir: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "RAY_TMPDIR": ray_dir, **extra}


@pytest.mark.parametrize("how", ["--ray-address", "RAY_ADDRESS"])
def test_joining_an_unreachable_cluster_is_exit_2_and_one_sentence(stale_ray_dir, tmp_path, how):
    ray_dir, _ = stale_ray_dir
    (dead,) = free_ports(1)
    args = ["label", str(PHOTOS), str(tmp_path / "out"), "--model", "tiny-demo"]
    env = _env(ray_dir)
    if how == "--ray-address":
        args += ["--ray-address", f"127.0.0.1:{dead}"]
    else:
        env["RAY_ADDRESS"] = f"127.0.0.1:{dead}"
    failed = _diffseg(args, env, timeout=90)  # a bound on a hang, not a timing claim
    assert failed.returncode == 2, failed.stderr[-3000:]
    lines = [line for line in failed.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, failed.stderr[-3000:]
    assert lines[0].startswith(f"diffseg label: error: Cannot reach the Ray cluster at 127.0.0.1:{dead} ")
    assert not (tmp_path / "out" / "_manifest.json").exists()

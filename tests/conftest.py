"""Shared pytest fixtures.  Tests never reach a model hub."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

# Ray Data binds its log handler to sys.stderr as it is when ray.data is first imported. Imported
# here, that is the session's stderr; first imported inside a test using capfd or capsys, it would
# be that test's capture, closed when the test ends, and every later Ray Data log line in this
# process would print "--- Logging error ---" with a traceback (which tests watching stderr for
# tracebacks then see). A test artefact only: a user's process has one stderr throughout.
import ray.data  # noqa: E402,F401


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    """A tiny SD 1.x-shaped diffusers folder with RANDOM weights (built once per session)."""
    from diffseg_core.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-sd1"), variant="sd1", seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl_model_path(tmp_path_factory):
    """A tiny SDXL-shaped diffusers folder with RANDOM weights (built once per session)."""
    from diffseg_core.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-sdxl"), variant="sdxl", seed=0)


# --- pipeline tests (issue 4; owner: pipeline) --------------------------------------------
@pytest.fixture(scope="session")
def ray_session():
    """One local Ray (2 CPUs, like CI) shared by every pipeline test; label() reuses it."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=1 << 30, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def stale_ray_dir():
    """A Ray temp root whose ``ray_current_cluster`` names a cluster that is gone (what a crashed
    ``ray start`` leaves behind). Short path: Ray's socket names must fit in 107 bytes."""
    import shutil
    import tempfile
    from pathlib import Path

    from ray_processes import free_ports

    root = tempfile.mkdtemp(prefix="rs", dir="/tmp")
    (port,) = free_ports(1)
    Path(root, "ray").mkdir()
    Path(root, "ray", "ray_current_cluster").write_text(f"127.0.0.1:{port}\n")
    yield root, port
    shutil.rmtree(root, ignore_errors=True)

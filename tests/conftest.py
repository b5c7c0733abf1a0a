"""Shared pytest fixtures.  Tests never reach a model hub."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402


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

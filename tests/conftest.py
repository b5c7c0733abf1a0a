"""Shared pytest fixtures.  Tests never reach a model hub."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

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


# --- one labelled photo folder, restored per test (issue 32) ------------------------------
@dataclasses.dataclass(frozen=True)
class LabelledPhotos:
    """``make_photo_folder(src)`` labelled once with FAST into ``out``: this test's own copy."""

    src: Path
    out: Path
    ids: list[str]
    first: dict  # the first run's summary


@pytest.fixture(scope="session")
def _labelled_photos_template(ray_session, tmp_path_factory):
    """The first run many rerun tests start from, made once: a real ``label()`` on the shared Ray.
    Kept aside as ``template/``; each test gets a byte-for-byte copy at the paths the run used
    (``work/in``, ``work/out``), since the manifest, the plan and the rows name those paths."""
    import shutil

    from pipeline import label
    from pipeline_helpers import FAST, make_photo_folder

    root = tmp_path_factory.mktemp("labelled-photos")
    src, out = root / "work" / "in", root / "work" / "out"
    ids = make_photo_folder(src)
    first = label(str(src), str(out), **FAST)
    assert first["complete"] and first["labelled"] == 3, first
    shutil.copytree(root / "work", root / "template", symlinks=True)  # copy2: the inputs' mtimes too
    return root, ids, first


@pytest.fixture
def labelled_photos(_labelled_photos_template) -> LabelledPhotos:
    """A fresh copy of the template for this test: what it changes, no other test sees, in any order.
    One test at a time per process uses it (the paths are the template's), as pytest runs them."""
    import copy
    import shutil

    root, ids, first = _labelled_photos_template
    shutil.rmtree(root / "work", ignore_errors=True)
    shutil.copytree(root / "template", root / "work", symlinks=True)
    return LabelledPhotos(root / "work" / "in", root / "work" / "out", list(ids), copy.deepcopy(first))

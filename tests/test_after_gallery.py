"""diffseg show: overlays + index.html, opened in a real headless Chromium."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from after_helpers import write_labels
from PIL import Image

from pipeline.after.cli import main as after_main
from pipeline.after.gallery import PALETTE, boundaries, overlay

APT_INSTALL = "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium"


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium; installed with apt when missing (CI), skipped only if that fails."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip("chromium is not installed and cannot be installed here (needs apt-get as root): " + APT_INSTALL)
    proc = subprocess.run(["bash", "-c", APT_INSTALL], capture_output=True, text=True, timeout=900)
    found = shutil.which("chromium")
    if proc.returncode != 0 or not found:
        pytest.skip(f"installing chromium failed ({APT_INSTALL}): {proc.stderr[-500:]}")
    return found


def _browser(chromium: str, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={tmp / 'profile'}", "--window-size=1200,900", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    from skimage import data
    from skimage.segmentation import slic

    root = tmp_path_factory.mktemp("show")
    images = _mkdir(root / "images")
    rows = []
    for name in ("astronaut", "coffee", "chelsea"):
        img = getattr(data, name)()
        small = np.asarray(Image.fromarray(img).resize((img.shape[1] // 3, img.shape[0] // 3)))
        Image.fromarray(small).save(images / f"{name}.jpg")
        rows.append((f"{name}.jpg", slic(small, n_segments=10, start_label=0)))
    rows.append(("missing-source.jpg", np.zeros((10, 10), dtype=np.int64)))
    rows.append(("broken.jpg", "truncated image: image file is truncated"))
    labels = write_labels(root / "labels", [rows])
    return root, labels


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def test_overlay_draws_segments_and_boundaries():
    image = np.full((8, 10, 3), 100, dtype=np.uint8)
    labels = np.zeros((8, 10), dtype=np.int64)
    labels[:, 5:] = 1
    out = overlay(image, labels)
    assert out.shape[0] == 8 and out.shape[1] > 20
    assert np.array_equal(out[:, :10], image)
    right = out[:, -10:]
    assert (right[boundaries(labels)] == 255).all()
    assert tuple(right[0, 0]) == tuple(((100 * 0.5 + PALETTE[0] * 0.5)).astype(np.uint8))
    assert len({tuple(c) for c in PALETTE[:64]}) == 64  # distinct colours


def test_gallery_renders_in_chromium(gallery, chromium, tmp_path, capsys):
    root, labels = gallery
    out = root / "gallery"
    assert after_main(["show", str(labels), "--images", str(root / "images"), "--out", str(out), "--n", "64"]) == 0
    assert "3 images shown, 1 error rows listed, 1 source images unreadable" in capsys.readouterr().out
    page = (out / "index.html").read_text()
    assert "broken.jpg" in page and "truncated image" in page and "missing-source.jpg" in page
    assert len(list((out / "overlays").glob("*.png"))) == 3

    dom = _browser(chromium, tmp_path, "--virtual-time-budget=10000", "--dump-dom", (out / "index.html").as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    widths = [int(w) for w in re.findall(r'data-natural-width="(\d+)"', dom.stdout)]
    assert len(widths) == 3 and all(w > 0 for w in widths), dom.stdout[-2000:]
    assert 'data-images-loaded="3"' in dom.stdout

    shot = tmp_path / "gallery.png"
    res = _browser(chromium, tmp_path, f"--screenshot={shot}", "--virtual-time-budget=10000", (out / "index.html").as_uri())
    assert res.returncode == 0 and shot.exists(), res.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (900, 1200) and pixels.std() > 20  # not a blank page
    if os.environ.get("DIFFSEG_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["DIFFSEG_KEEP_SCREENSHOT"])


def test_gallery_says_when_labels_come_from_random_weights_or_a_demo_model(gallery, tmp_path):
    import json

    from pipeline.after.gallery import build_gallery

    root, labels = gallery
    images = str(root / "images")
    # No manifest (or a real model): no banner.
    build_gallery(str(labels), images, str(tmp_path / "plain"), n=1)
    assert "random weights" not in (tmp_path / "plain" / "index.html").read_text()
    manifest = Path(labels) / "_manifest.json"
    try:
        manifest.write_text(json.dumps({"model": {"model": "tiny-random", "random_weights": True}}))
        build_gallery(str(labels), images, str(tmp_path / "random"), n=1)
        page = (tmp_path / "random" / "index.html").read_text()
        assert "These labels come from tiny-random, a model with random weights" in page
        manifest.write_text(json.dumps({"model": {"model": "tiny-demo", "demo_model": True, "random_weights": False,
                                                  "description": "a demo model trained for minutes <here>"}}))
        build_gallery(str(labels), images, str(tmp_path / "demo"), n=1)
        page = (tmp_path / "demo" / "index.html").read_text()
        assert "These labels come from tiny-demo, a demo model, not Stable Diffusion:" in page
        assert "a demo model trained for minutes &lt;here&gt;" in page and "random weights" not in page
    finally:
        manifest.unlink(missing_ok=True)

"""Training reader: each labelled (image, label map) pair exactly once across DataLoader workers and ranks."""
from __future__ import annotations

import io
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from after_helpers import write_labels
from PIL import Image
from torch.utils.data import DataLoader

from pipeline.after.reader import PseudoLabelDataset, ray_dataset


def _image(i: int, h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(i)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """11 image files + a tar shard of 3 (PNG, lossless), labels in 3 files with row groups of 2; one error row."""
    root = tmp_path_factory.mktemp("reader")
    images, expected, rows = root / "images", {}, []
    for i in range(11):
        h, w = 12 + i, 16 + 2 * i
        img = _image(i, h, w)
        rel = f"d{i % 2}/img{i:02d}.png"
        (images / rel).parent.mkdir(parents=True, exist_ok=True)
        (images / rel).write_bytes(_png(img))
        labels = (np.arange(h * w).reshape(h, w) // max(1, (h * w) // 3)).astype(np.int64)
        expected[rel] = (img, labels)
        rows.append((rel, labels))
    with tarfile.open(images / "shard-0.tar", "w") as tar:
        for k in range(3):
            img = _image(100 + k, 10, 14)
            body = _png(img)
            info = tarfile.TarInfo(f"s{k}.png")
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
            labels = np.zeros((10, 14), dtype=np.int64)
            labels[:, 7:] = 1
            expected[f"shard-0.tar/s{k}"] = (img, labels)
            rows.append((f"shard-0.tar/s{k}", labels))
    rows.insert(4, ("d0/broken.png", "decode error: no"))
    write_labels(root / "labels", [rows[:6], rows[6:11], rows[11:]], row_group_size=2)
    return root, expected


def _ids(dataset, workers: int) -> list[str]:
    loader = DataLoader(dataset, batch_size=None, num_workers=workers)
    return [image_id for image_id, _, _ in loader]


@pytest.mark.parametrize("shard_by", ["row", "file"])
def test_two_workers_yield_each_pair_once(data, shard_by):
    root, expected = data
    ds = PseudoLabelDataset(str(root / "labels"), str(root / "images"), shard_by=shard_by, return_id=True)
    ids = _ids(ds, workers=2)
    assert Counter(ids) == Counter(list(expected)), "every labelled image exactly once, error row skipped"


def test_ranks_times_workers_partition_the_pairs(data):
    root, expected = data
    per_rank = [
        _ids(PseudoLabelDataset(str(root / "labels"), str(root / "images"), rank=r, world_size=2, return_id=True), 2)
        for r in range(2)
    ]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert Counter(per_rank[0] + per_rank[1]) == Counter(list(expected))
    assert abs(len(per_rank[0]) - len(per_rank[1])) <= 2  # row sharding balances ranks


def test_pairs_are_the_source_pixels_and_the_labels(data):
    root, expected = data
    ds = PseudoLabelDataset(str(root / "labels"), str(root / "images"), return_id=True)
    seen = 0
    for image_id, image, labels in ds:
        want_img, want_lab = expected[image_id]
        assert image.dtype == torch.float32 and image.shape == (3, *want_lab.shape)
        assert torch.equal((image * 255).round().to(torch.uint8).permute(1, 2, 0), torch.from_numpy(want_img))
        assert labels.dtype == torch.int64 and torch.equal(labels, torch.from_numpy(want_lab))
        seen += 1
    assert seen == len(expected)
    # a fixed size lets a DataLoader stack batches
    batch = next(iter(DataLoader(PseudoLabelDataset(str(root / "labels"), str(root / "images"), size=8),
                                 batch_size=4)))
    assert batch[0].shape == (4, 3, 8, 8) and batch[1].shape == (4, 8, 8)


def test_ray_dataset_yields_the_same_pairs(data, ray_session):
    root, expected = data
    rows = ray_dataset(str(root / "labels"), str(root / "images"), size=8).take_all()
    assert Counter(r["image_id"] for r in rows) == Counter(list(expected))
    assert rows[0]["image"].shape == (8, 8, 3) and rows[0]["label"].shape == (8, 8)


def _example():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "train_on_pseudo_labels.py"
    spec = importlib.util.spec_from_file_location("train_on_pseudo_labels", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


def _readme_training_block() -> tuple[list[str], list[int]]:
    """(the README's training command as argv, the step numbers of the lines it shows printed)."""
    import shlex
    from pathlib import Path

    lines = (Path(__file__).resolve().parents[1] / "README.md").read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("$ python examples/train_on_pseudo_labels.py"))
    argv = shlex.split(lines[at][2:])[2:]
    steps = []
    for line in lines[at + 1:]:
        if not line.startswith("step "):
            break
        steps.append(int(line.split()[1]))
    return argv, steps


def test_training_example_runs_learns_and_prints_what_the_readme_shows(data, capsys):
    example = _example()
    readme_argv, readme_steps = _readme_training_block()
    options = readme_argv[2:]  # after LABELS IMAGES; then smaller and in-process (the last --size wins)
    assert "--steps" in options and len(readme_steps) >= 3
    root, _ = data
    assert example.main([str(root / "labels"), str(root / "images"), *options, "--size", "16", "--workers", "0"]) == 0
    printed = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
    assert [int(p[1]) for p in printed] == readme_steps
    losses = [float(p[3]) for p in printed]
    assert losses[-1] < losses[0]

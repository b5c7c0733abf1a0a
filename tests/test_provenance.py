"""What the workers did is what the manifest says (issue 24).

Every label option (LabelOptions' fields and the spec keys that map to them) has a case here: two
small real jobs run with non-default values, and each case asserts the value the workers report
they used (their provenance, kept in each committed shard's marker) equals it. A new option
without a case (or a reason it changes no label) fails ``test_every_label_option_has_a_case``.
Beside them, the driver's check: a record from a worker that disagrees stops the run with one
sentence and commits nothing; and the behaviours the provenance alone cannot show.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import label
from pipeline.job.options import LabelOptions
from pipeline.job.provenance import VERSION_ENV, digest
from pipeline_helpers import read_output

REPO = Path(__file__).resolve().parents[1]

# job -> options (every value differs from LabelOptions' default and from the model's)
JOBS: dict[str, dict[str, Any]] = {
    "A": dict(model="tiny-random", image_size=64, dtype="bf16", vae_dtype="fp32", timestep=500,
              kl_threshold=[0.9, 0.8], num_points=2, refine=True, weights=[3.0, 2.0, 1.0], boundaries="pamr",
              pamr_iterations=3, pamr_dilations=[1, 2], min_region_area=8, connected=True, rle=True,
              rows_per_file=2, max_pixels=20_000, vocabulary=["cat", "dog"], class_voting="mean",
              class_threshold=0.3, batch_size=4),
    "B": dict(model="tiny-random", image_size=64, num_points=4, kl_threshold=0.7, iterations=2,
              paper_preprocess=True, image_column="picture", batch_size=4,
              grouping="ncut", ncut_threshold=0.4, ncut_affinity="features"),  # + vocabulary_file, below
}
VOCABULARY_FILE = ["sky", "tree"]

# field -> (job, stage, key in that stage's report, the value the workers must report)
CASES: dict[str, tuple[str, str, str, Any]] = {
    "model": ("A", "model", "model", "tiny-random"),
    "image_size": ("A", "model", "image_size", 64),
    "dtype": ("A", "model", "dtype", "bfloat16"),
    "vae_dtype": ("A", "model", "vae_dtype", "float32"),
    "timestep": ("A", "model", "timestep", 500),
    "kl_threshold": ("A", "model", "kl_threshold", [0.9, 0.8]),
    "iterations": ("B", "model", "kl_threshold", [0.7, 0.7]),
    "num_points": ("A", "model", "num_points", 2),
    "refine": ("A", "model", "refine", True),
    "weights": ("A", "model", "weights", [3.0, 2.0, 1.0]),
    "boundaries": ("A", "model", "boundaries", "pamr"),
    "pamr_iterations": ("A", "model", "pamr_iterations", 3),
    "pamr_dilations": ("A", "model", "pamr_dilations", [1, 2]),
    "min_region_area": ("A", "model", "min_region_area", 8),
    "connected": ("A", "model", "connected", True),
    "vocabulary": ("A", "model", "vocabulary", digest(["cat", "dog"])),
    "vocabulary_file": ("B", "model", "vocabulary", digest(VOCABULARY_FILE)),
    "class_voting": ("A", "model", "class_voting", "mean"),
    "class_threshold": ("A", "model", "class_threshold", 0.3),
    "grouping": ("B", "model", "grouping", "ncut"),
    "ncut_threshold": ("B", "model", "ncut_threshold", 0.4),
    "ncut_affinity": ("B", "model", "ncut_affinity", "features"),
    "rle": ("A", "encode", "rle", True),
    "max_pixels": ("A", "decode", "max_pixels", 20_000),
    "paper_preprocess": ("B", "decode", "paper_preprocess", True),
    "image_column": ("B", "decode", "image_column", "picture"),
    # the shard plan and the finalize task: every committed file holds at most this many rows
    "rows_per_file": ("A", "output", "rows_per_file", 2),
}
# fields that change no label, each with the reason
EXEMPT = {
    "revision": "a hub revision (no hub offline); every record's model.revision is compared with the driver's",
    "allow_unsafe_weights": "a permission to load pickle weights; the weights themselves are checked as a digest",
    "retry_errors": "which committed rows to redo, not how to label them",
    "part": "which input files this job plans (tests/test_parts.py), not how they are labelled",
    "overwrite": "what happens to an earlier output",
    "ray_address": "where Ray runs",
    "storage_options": "how storage is reached",
    "storage_retry_s": "how long storage faults are retried",
    **{f: "how many workers and where, not what they compute" for f in (
        "actors", "batch_size", "device", "gpu_wait_s", "gpus_per_actor", "cpus_per_actor", "threads_per_actor",
        "max_actors", "actor_resources")},
}


def test_every_label_option_has_a_case():
    from jobs.spec import SECTIONS

    fields = {f.name for f in dataclasses.fields(LabelOptions)}
    missing = fields - set(CASES) - set(EXEMPT)
    assert not missing, f"options with no provenance case (add one to CASES, or a reason to EXEMPT): {missing}"
    assert not (set(CASES) | set(EXEMPT)) - fields  # no case for an option that is gone
    spec_fields = {target for schema in SECTIONS.values() for _, target in schema.values() if target}
    assert spec_fields <= fields  # every spec key maps to an option the cases cover


def _spec_key(field: str) -> tuple[str, str] | None:
    from jobs.spec import SECTIONS

    return next(((section, key) for section, schema in SECTIONS.items() for key, (_, target) in schema.items()
                 if target == field), None)


@pytest.mark.parametrize("field", sorted(f for f in CASES if f != "model"))
def test_each_spec_key_gives_its_option(field, tmp_path):
    """The spec's key for an option gives label() the same value the job below ran with."""
    from jobs.spec import parse_spec

    where = _spec_key(field)
    assert where is not None, f"{field} has no spec key"
    section, key = where
    if field == "vocabulary_file":
        (tmp_path / "names.txt").write_text("\n".join(VOCABULARY_FILE) + "\n")
        value = str(tmp_path / "names.txt")
    else:
        value = JOBS[CASES[field][0]][field]
    spec = parse_spec({"input": "/in", "output": "/out", "model": {"name": "tiny-random"}, section: {key: value}})
    assert spec.options[field] == value


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _inputs(root: Path, rng: np.random.Generator) -> dict[str, Path]:
    a = root / "in-a"
    a.mkdir(parents=True)
    for i, (h, w) in enumerate([(48, 64), (64, 40), (30, 30), (64, 64)]):
        (a / f"small{i}.png").write_bytes(_png(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
    (a / "photo.png").write_bytes(_png(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)))  # 60,000 px
    b = root / "in-b"
    b.mkdir()
    for i in range(2):
        (b / f"img{i}.png").write_bytes(_png(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)))
    pictures = [_png(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)) for _ in range(2)]
    pq.write_table(pa.table({"picture": pa.array(pictures, pa.binary()), "id": ["p0", "p1"]}), b / "shard.parquet")
    return {"A": a, "B": b}


@pytest.fixture(scope="module")
def jobs(tmp_path_factory, ray_session) -> dict[str, dict[str, Any]]:
    root = tmp_path_factory.mktemp("provenance")
    inputs = _inputs(root, np.random.default_rng(0))
    names = root / "names.txt"
    names.write_text("\n".join(VOCABULARY_FILE) + "\n")
    out = {}
    for job, options in JOBS.items():
        extra = {"vocabulary_file": str(names)} if job == "B" else {}
        summary = label(str(inputs[job]), str(root / f"out-{job}"), **options, **extra)
        markers = [json.loads(p.read_text()) for p in sorted((root / f"out-{job}" / "_done").glob("*.json"))]
        out[job] = {"summary": summary, "markers": markers, "output": root / f"out-{job}", "input": inputs[job]}
    return out


def _reports(job: dict[str, Any], stage: str) -> list[dict[str, Any]]:
    reports = [r for m in job["markers"] for r in m.get("provenance", []) if r["stage"] == stage]
    assert reports, f"no {stage} report in {len(job['markers'])} markers"
    return reports


@pytest.mark.parametrize("field", sorted(CASES))
def test_each_label_option_reaches_the_workers(jobs, field):
    job, stage, key, want = CASES[field]
    if stage == "output":  # rows_per_file: what the committed files hold
        rows = [pq.ParquetFile(p).metadata.num_rows for p in jobs[job]["output"].glob("labels-*.parquet")]
        assert len(rows) >= 3 and max(rows) <= want and sum(rows) == len(list(jobs[job]["input"].iterdir())), rows
        return
    values = {json.dumps(r[key]) for r in _reports(jobs[job], stage)}
    assert values == {json.dumps(want)}, (field, values)


def test_every_marker_names_what_each_stage_ran_with(jobs):
    from pipeline.data.manifest import package_version

    for job in jobs.values():
        for marker in job["markers"]:
            if not marker.get("files"):
                continue
            stages = {r["stage"] for r in marker["provenance"]}
            assert stages == {"decode", "model", "encode"}
            assert {r["version"] for r in marker["provenance"]} == {package_version()}


def test_the_summary_reports_the_driver_cpu_and_memory(jobs):
    """What benchmarks/driver_bench.py reads: the driver's CPU over the stream and its peak RSS."""
    for job in jobs.values():
        driver = job["summary"]["driver"]
        assert set(driver) == {"cpu_s_pipeline", "peak_rss_mb", "memory_releases"}
        assert driver["cpu_s_pipeline"] > 0 and driver["peak_rss_mb"] > 50, driver
        assert driver["memory_releases"] >= 0


def test_max_pixels_below_a_photo_makes_a_decompression_bomb_error_row(jobs):
    table = read_output(str(jobs["A"]["output"])).to_pylist()
    errors = {r["image_id"]: r["error"] for r in table}
    assert "decompression bomb" in (errors["photo.png"] or ""), errors
    assert all(errors[f"small{i}.png"] is None for i in range(4)), errors


def test_the_pipeline_labels_as_the_library_does(ray_session, tmp_path):
    """`diffseg label` and DiffSeg.from_pretrained(model)(image) agree label for label: decode and
    resize included, with --refine and the model card's PAMR (tiny-demo), non-square images.

    The photos are tiny-demo scenes (coloured, textured shapes) at sizes other than the model's,
    so that decoding BGR instead of RGB, or resizing with another filter than the library's
    bicubic, changes the labels (issue 31, item 8)."""
    from diffseg_core.demo_model.scenes import HELD_OUT_SEEDS, make_scene
    from diffseg_core.segmentor import DiffSeg
    from pipeline.data.encode import decode_png

    src = tmp_path / "in"
    src.mkdir()
    images = {}
    for i, size in enumerate([(240, 400), (420, 252), (300, 300)]):  # none the model's square
        img = make_scene(HELD_OUT_SEEDS[i], size).image
        images[f"img{i}.png"] = img
        (src / f"img{i}.png").write_bytes(_png(img))
    label(str(src), str(tmp_path / "out"), model="tiny-demo", refine=True, batch_size=2)
    rows = {r["image_id"]: r for r in read_output(str(tmp_path / "out")).to_pylist()}
    library = DiffSeg.from_pretrained("tiny-demo", refine=True)
    agree = {}
    for name, img in images.items():
        want = library([img])[0]
        got = decode_png(rows[name]["label_map"])
        assert got.shape == want.shape == img.shape[:2]
        agree[name] = float((got == want).mean())
    # float sums in another order (a batch of 2 against one image) may flip a pixel on a tie
    assert min(agree.values()) >= 0.999, agree


def test_two_timesteps_give_different_attention():
    import torch

    from diffseg_core.extract import AttentionExtractor

    image = np.random.default_rng(0).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
    maps = {t: AttentionExtractor.from_pretrained("tiny-demo", timestep=t)(image) for t in (100, 800)}
    for r in maps[100]:
        assert not torch.allclose(maps[100][r], maps[800][r], atol=1e-4), r


def test_a_worker_with_another_package_version_is_refused(tmp_path):
    """A node whose install differs from the driver's (here every worker, through its environment)."""
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.png").write_bytes(_png(np.full((40, 40, 3), 120, dtype=np.uint8)))
    env = dict(os.environ, **{VERSION_ENV: "0.0.1-old", "HF_HUB_OFFLINE": "1"})
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "label", str(src), str(out), "--model", "tiny-random", "--image-size",
         "64", "--num-points", "4", "--ray-address", "local"],
        env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 2, result.stderr[-3000:]
    said = [line for line in result.stderr.splitlines() if "0.0.1-old" in line]
    assert len(said) == 1, result.stderr[-3000:]
    from pipeline.data.manifest import package_version

    assert "on node " in said[0] and "version" in said[0] and package_version() in said[0], said[0]
    assert not list((out / "_done").glob("*.json")) if (out / "_done").exists() else True
    assert not list(out.glob("labels-*.parquet"))


# --- the driver's check, on planted records (no Ray) ------------------------------------------


def _record(shard_id: int, provenance: str | None, rows: int = 2) -> pa.Table:
    from pipeline.job.sink import RECORD_SCHEMA, row_hashes

    ids = [f"{shard_id}-{i}" for i in range(rows)]
    rec = {"shard_id": shard_id, "shard_rows": rows, "file": f"_inprogress/{shard_id}/x.arrow", "rows": rows,
           "row_hashes": row_hashes(ids), "errors": "{}", "bytes": 1, "failure": None, "fatal": False,
           "node_id": "n1", "provenance": provenance}
    return pa.Table.from_pylist([rec], schema=RECORD_SCHEMA)


def _reports_json(**changes: Any) -> str:
    from pipeline.job.provenance import fold

    want = _want()
    out = []
    for stage, fields in want.items():
        body = {"stage": stage, "node": "10.0.0.7 (abcd1234)", **fields, **changes.get(stage, {})}
        out.append(json.dumps(body, sort_keys=True, separators=(",", ":")))
    return fold(out)


def _want() -> dict[str, dict[str, Any]]:
    from pipeline.job.provenance import expected

    opts = LabelOptions(model="tiny-random", num_points=4)
    return expected(opts, image_size=64, dtype="fp32", model_info={"model": "tiny-random", "revision": None,
                                                                      "weights_sha256": None})


class _NoSubmit:
    """A Committer that records what it would submit, instead of starting a Ray task."""

    def __new__(cls, tmp_path: Path):
        import fsspec

        from pipeline.job.commit import Committer
        from pipeline.job.provenance import ProvenanceCheck
        from pipeline.job.sink import OutputLocation

        class Recording(Committer):
            submitted: list[int] = []

            def _submit(self, shard_id, shard):
                self.submitted.append(shard_id)
                shard.submitted = True

        return Recording(fsspec.filesystem("file"), str(tmp_path), OutputLocation(str(tmp_path)), 1000, {},
                         provenance=ProvenanceCheck(_want()))


def test_a_record_from_a_worker_that_disagrees_stops_the_run_and_commits_nothing(tmp_path):
    from pipeline.job.commit import CommitError

    committer = _NoSubmit(tmp_path)
    committer.add(_record(0, _reports_json()))
    assert committer.submitted == [0]
    with pytest.raises(CommitError) as caught:
        committer.add(_record(1, _reports_json(model={"refine": True})))
    sentence = str(caught.value)
    assert sentence.count(". ") == 0 or sentence.endswith("."), sentence
    for part in ("a model actor on node 10.0.0.7 (abcd1234)", "refine = true", "this run's refine is false",
                 "shard 1 is left uncommitted"):
        assert part in sentence, sentence
    assert committer.submitted == [0]
    with pytest.raises(CommitError, match="without saying what it ran with"):
        committer.add(_record(2, None))
    with pytest.raises(CommitError, match="decode task on node .* ran with version = \"9.9\""):
        committer.add(_record(3, _reports_json(decode={"version": "9.9"})))


def test_the_provenance_of_a_good_record_is_parsed_once(tmp_path):
    committer = _NoSubmit(tmp_path)
    good = _reports_json()
    for shard in range(5):
        committer.add(_record(shard, good))
    assert list(committer.provenance.good) == [good] and committer.submitted == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 1, 0), (1, 2, 0), (2, 0, 1)])
def test_a_shard_row_count_does_not_depend_on_the_order_its_decode_chunks_arrive(tmp_path, order):
    """read_decode sends a shard in chunks, the last carrying the row count (-1 before it); the
    committer must submit the shard once, when its last row is in, whatever order they come in."""
    from pipeline.job.sink import RECORD_SCHEMA, row_hashes

    good = _reports_json()
    chunks = [[f"img{i}" for i in range(0, 32)], [f"img{i}" for i in range(32, 64)], [f"img{i}" for i in range(64, 74)]]
    committer = _NoSubmit(tmp_path)
    for step, c in enumerate(order):
        ids = chunks[c]
        rec = {"shard_id": 7, "shard_rows": 74 if c == 2 else -1, "file": f"_inprogress/7/{c}.arrow",
               "rows": len(ids), "row_hashes": row_hashes(ids), "errors": "{}", "bytes": 1, "failure": None,
               "fatal": False, "node_id": "n1", "provenance": good}
        committer.add(pa.Table.from_pylist([rec], schema=RECORD_SCHEMA))
        assert committer.submitted == ([7] if step == 2 else []), (order, step)
    assert len(committer.open[7].seen) == 74 and committer.open[7].total == 74

"""Every field the provenance check compares is proven to be compared (issue 34, item 1).

The reports come from the real builders: a real LabelActor (tiny-random, a RANDOM model, on the
CPU) for the model stage, decode_provenance and encode_provenance for the others, all with the
settings of one LabelOptions; the run's side is provenance.expected() of those options. Each
case changes one field of one stage's report and feeds the record to a real Committer with the
provenance check: it must stop with the one sentence naming the field and both values, and
commit nothing. ``test_every_reported_field_has_a_case`` lists the fields the builders put in
the reports: a new one without a case here fails it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from pipeline.job.options import LabelOptions
from pipeline.job.provenance import decode_provenance, digest, encode_provenance, expected, fold

SIZE = 64
# non-defaults, so that every optional field is reported and compared (PAMR, a vocabulary, vae_dtype, ncut)
OPTIONS = dict(model="tiny-random", image_size=SIZE, num_points=4, kl_threshold=0.9, iterations=2,
               weights=[3.0, 2.0, 1.0], boundaries="pamr", pamr_iterations=3, pamr_dilations=[1, 2],
               min_region_area=8, connected=True, vae_dtype="fp32", vocabulary=["cat", "dog"],
               class_voting="mean", class_threshold=0.3, max_pixels=20_000, image_column="picture", rle=True,
               grouping="ncut", ncut_threshold=0.4, ncut_affinity="features")
ROUTING = ("stage", "node")  # where a report came from: said in the sentence, not compared

# (stage, field) -> a value that differs from the run's in that field alone
CASES: dict[tuple[str, str], Any] = {
    ("decode", "version"): "0.0.1-old",
    ("decode", "image_size"): SIZE * 2,
    ("decode", "max_pixels"): 20_001,
    ("decode", "paper_preprocess"): True,
    ("decode", "image_column"): "image",
    ("model", "version"): "0.0.1-old",
    ("model", "model"): "tiny-demo",
    ("model", "revision"): "main",
    ("model", "model_weights"): digest(["another sha256"]),
    ("model", "dtype"): "bfloat16",
    ("model", "vae_dtype"): "float16",
    ("model", "image_size"): SIZE * 2,
    ("model", "timestep"): 301,
    ("model", "kl_threshold"): [0.9, 0.8],
    ("model", "num_points"): 5,
    ("model", "refine"): True,
    ("model", "weights"): [3.0, 2.0, 0.0],
    ("model", "boundaries"): "off",
    ("model", "pamr_iterations"): 4,
    ("model", "pamr_dilations"): [1, 3],
    ("model", "min_region_area"): 9,
    ("model", "connected"): False,
    ("model", "grouping"): "kl-merge",
    ("model", "ncut_threshold"): 0.41,
    ("model", "ncut_affinity"): "attention",
    ("model", "vocabulary"): digest(["cat", "cow"]),
    ("model", "class_voting"): "majority",
    ("model", "class_threshold"): 0.31,
    ("encode", "version"): "0.0.1-old",
    ("encode", "rle"): False,
    ("encode", "class_names"): digest(["cat", "cow"]),
}


@pytest.fixture(scope="module")
def run() -> dict[str, Any]:
    """The run's side (expected) and the three reports the real builders make for it."""
    from pipeline.job.actors import LabelActor

    opts = LabelOptions(**OPTIONS).with_model_defaults()
    actor = LabelActor(opts.model, device="cpu", dtype="fp32", vae_dtype=opts.vae_dtype, image_size=SIZE,
                       timestep=opts.timestep, revision=None, diffseg_kwargs=opts.diffseg_kwargs(), threads=1,
                       vocabulary=list(opts.vocabulary), class_voting=opts.class_voting,
                       class_threshold=opts.class_threshold)
    reports = {
        "decode": decode_provenance(image_size=SIZE, max_pixels=opts.max_pixels,
                                    paper_preprocess=bool(opts.paper_preprocess), image_column=opts.image_column),
        "model": actor.provenance,
        "encode": encode_provenance(rle=bool(opts.rle), class_names=list(opts.vocabulary)),
    }
    want = expected(opts, image_size=SIZE, dtype="fp32", model_info=actor.extractor.model_info)
    return {"want": want, "reports": {stage: json.loads(text) for stage, text in reports.items()}}


def _provenance(reports: dict[str, dict[str, Any]], stage: str | None = None, field: str | None = None,
                value: Any = None) -> str:
    """The record's provenance, as the sink folds it, with ``stage``'s ``field`` set to ``value``."""
    bodies = []
    for name, report in reports.items():
        body = dict(report, **({field: value} if name == stage else {}))
        bodies.append(json.dumps(body, sort_keys=True, separators=(",", ":")))
    return fold(bodies)


def _record(shard_id: int, provenance: str, rows: int = 3) -> pa.Table:
    from pipeline.job.sink import RECORD_SCHEMA, row_hashes

    rec = {"shard_id": shard_id, "shard_rows": rows, "file": f"_inprogress/{shard_id}/x.arrow", "rows": rows,
           "row_hashes": row_hashes([f"{shard_id}-{i}" for i in range(rows)]), "errors": "{}", "bytes": 1,
           "failure": None, "fatal": False, "node_id": "n1", "provenance": provenance}
    return pa.Table.from_pylist([rec], schema=RECORD_SCHEMA)


def _committer(tmp_path: Path, want: dict[str, dict[str, Any]]):
    """The real Committer with the provenance check; its finalize submission recorded, not run on Ray."""
    import fsspec

    from pipeline.job.commit import Committer
    from pipeline.job.provenance import ProvenanceCheck
    from pipeline.job.sink import OutputLocation

    class Recording(Committer):
        def _submit(self, shard_id, shard):
            self.submitted.append(shard_id)
            shard.submitted = True

    out = str(tmp_path / "out")
    committer = Recording(fsspec.filesystem("file"), out, OutputLocation(out), 1000, {},
                          provenance=ProvenanceCheck(want))
    committer.submitted = []
    return committer


def test_every_reported_field_has_a_case(run):
    reported = {(stage, f) for stage, report in run["reports"].items() for f in report if f not in ROUTING}
    missing = reported - set(CASES)
    assert not missing, f"report fields with no case in CASES (add one): {sorted(missing)}"
    assert not set(CASES) - reported, f"cases for fields no report carries: {sorted(set(CASES) - reported)}"


def test_every_reported_field_is_compared(run):
    """The run's side names every field the workers report, so each one is checked."""
    for stage, report in run["reports"].items():
        assert set(run["want"][stage]) == set(report) - set(ROUTING), stage


def test_the_real_reports_of_the_same_settings_pass(tmp_path, run):
    committer = _committer(tmp_path, run["want"])
    committer.add(_record(0, _provenance(run["reports"])))
    assert committer.submitted == [0]


@pytest.mark.parametrize("stage, field", sorted(CASES), ids=lambda v: v)
def test_a_report_differing_in_one_field_stops_the_run_and_commits_nothing(tmp_path, run, stage, field):
    from pipeline.job.commit import CommitError

    good, bad = run["reports"][stage][field], CASES[(stage, field)]
    assert bad != good and type(bad) is type(good) or good is None, (good, bad)
    committer = _committer(tmp_path, run["want"])
    committer.add(_record(0, _provenance(run["reports"])))  # a good shard first: the check is not just closed
    with pytest.raises(CommitError) as caught:
        committer.add(_record(1, _provenance(run["reports"], stage, field, bad)))
    sentence = str(caught.value)
    where = {"decode": "a read/decode task", "model": "a model actor", "encode": "an encode task"}[stage]
    assert sentence.startswith(f"{where} on node "), sentence
    assert f"ran with {field} = {json.dumps(bad)}, but this run's {field} is {json.dumps(good)}" in sentence, sentence
    assert "shard 1 is left uncommitted" in sentence, sentence
    assert sentence.endswith(".") and ". " not in sentence and "\n" not in sentence, sentence  # one sentence
    assert committer.submitted == [0] and committer.committed == []
    assert not committer.open[1].seen and committer.open[1].total == -1  # none of its rows counted
    assert not (tmp_path / "out" / "_done").exists()

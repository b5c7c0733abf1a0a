"""Job specs and the `diffseg` job commands without a cluster: validation, dry run, help, secrets, tokens."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from jobs import cli
from jobs.connect import ClusterError, find_token, resolve_address
from jobs.spec import SECTIONS, SpecError, load_spec, parse_spec
from jobs.submit import normalize_output
from pipeline.job.options import LabelOptions

JOBS_DIR = Path(__file__).resolve().parents[1] / "jobs"
EXAMPLES = sorted(p for p in JOBS_DIR.glob("*.yaml") if not p.name.startswith("kuberay"))
GOOD = "input: /data/in\noutput: /data/out\nmodel: tiny-random\n"


def write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_example_specs_are_valid_and_cover_local_s3_gcs(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    specs = {p.name: load_spec(p) for p in EXAMPLES}
    assert {"local-folder.yaml", "s3-bucket.yaml", "gcs-bucket.yaml"} <= set(specs)
    assert specs["s3-bucket.yaml"].input.startswith("s3://") and specs["gcs-bucket.yaml"].input.startswith("gs://")
    for spec in specs.values():
        LabelOptions(**spec.options)  # every option is one that pipeline.label takes
        assert spec.ray_runtime_env()["py_modules"]  # the code travels with the job


def test_kuberay_manifest_is_a_rayjob_running_the_entrypoint():
    import yaml

    docs = list(yaml.safe_load_all((JOBS_DIR / "kuberay-rayjob.yaml").read_text()))
    rayjob = next(d for d in docs if d["kind"] == "RayJob")
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert rayjob["spec"]["entrypoint"].startswith("python -m jobs.run ")
    config = next(d for d in docs if d["kind"] == "ConfigMap")
    parse_spec(config["data"]["job.yaml"], source="configmap")  # the spec it mounts is valid


def test_every_spec_key_maps_to_a_label_option():
    fields = {f.name for f in dataclasses.fields(LabelOptions)}
    for schema in SECTIONS.values():
        for key, (_check, target) in schema.items():
            assert target is None or target in fields, key


@pytest.mark.parametrize(
    "text, key, words",
    [
        (GOOD + "colour: blue\n", "colour", "unknown key"),
        (GOOD + "method: {kl_treshold: 1.1}\n", "method.kl_treshold", "unknown key"),
        ("output: /data/out\n", "input", "missing"),
        ("input: /data/in\n", "output", "missing"),
        (GOOD + "resources: {batch_size: eight}\n", "resources.batch_size", "an integer, not str"),
        (GOOD + "resources: {batch_size: 0}\n", "resources.batch_size", ">= 1"),
        (GOOD + "resources: {merge_on: cpu}\n", "resources.merge_on", "unknown key"),
        (GOOD + "model: {name: tiny-random, vae_dtype: fp8}\n", "model.vae_dtype", "one of auto"),
        (GOOD + "method: {refine: 'yes'}\n", "method.refine", "true or false"),
        (GOOD + "method: {kl_threshold: -1}\n", "method.kl_threshold", "> 0"),
        (GOOD + "method: {kl_threshold: [1.1, 1.0], iterations: 3}\n", "method.iterations", "one per iteration"),
        (GOOD + "model: {name: tiny-random, dtype: fp8}\n", "model.dtype", "one of fp32"),
        (GOOD + "io: {rows_per_file: 1.5}\n", "io.rows_per_file", "an integer"),
        (GOOD + "runtime_env: {env_vars: [A, B]}\n", "runtime_env.env_vars", "a mapping"),
        (GOOD + "runtime_env: {conda: env}\n", "runtime_env.conda", "unknown key"),
        (GOOD + "runtime_env: {env_vars: {RAY_AUTH_TOKEN: abc}}\n", "runtime_env.env_vars.RAY_AUTH_TOKEN", "cluster"),
        ("input: data/in\noutput: /data/out\n", "input", "absolute path or a URL"),
        (GOOD + "name: 'two words'\n", "name", "letters, digits"),
        (GOOD + "io: {storage_options: {secret: hunter2}}\n", "io.storage_options.secret", "${SOME_VAR}"),
    ],
)
def test_bad_specs_name_the_file_and_the_key(tmp_path, text, key, words):
    path = write(tmp_path, text)
    with pytest.raises(SpecError) as err:
        load_spec(path)
    message = str(err.value)
    assert message.startswith(f"{path}: {key}: ") and words in message and "\n" not in message
    assert "hunter2" not in message


def test_yaml_is_read_with_the_safe_loader(tmp_path):
    path = write(tmp_path, GOOD + "name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(path)


def test_not_a_mapping_and_unreadable_files(tmp_path):
    with pytest.raises(SpecError, match="must be a mapping"):
        load_spec(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(SpecError, match="cannot read the spec"):
        load_spec(tmp_path / "missing.yaml")


def test_content_hash_ignores_comments_and_key_order_but_not_values(tmp_path):
    a = load_spec(write(tmp_path, GOOD + "method: {num_points: 4, refine: true}\n", "a.yaml"))
    b = load_spec(write(tmp_path, "# a comment\nmodel: tiny-random\nmethod: {refine: true, num_points: 4}\n"
                                  "output: /data/out\ninput: /data/in\nname: a\n", "b.yaml"))
    c = load_spec(write(tmp_path, GOOD + "method: {num_points: 8, refine: true}\n", "a2.yaml"))
    assert a.submission_prefix == b.submission_prefix == f"diffseg-a-{a.content_hash[:10]}"
    assert c.content_hash != a.content_hash


def test_entrypoint_json_round_trips_through_the_same_validation(tmp_path):
    spec = load_spec(write(tmp_path, GOOD + "method: {kl_threshold: [1.1, 0.9]}\nresources: {driver_cpus: 1}\n"))
    again = parse_spec(spec.entrypoint_json())
    assert again.options == spec.options and again.input == spec.input and spec.driver == {"entrypoint_num_cpus": 1.0}


def test_dry_run_prints_the_resolved_job_with_secrets_masked(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MY_SECRET_KEY", "s3cr3t-value")
    path = write(tmp_path, GOOD + "runtime_env:\n  env_vars:\n    AWS_SECRET_ACCESS_KEY: ${MY_SECRET_KEY}\n"
                                  "    API_TOKEN: literal-t0ken\n    HF_HUB_OFFLINE: 1\n"
                                  "io: {storage_options: {key: '${MY_SECRET_KEY}'}}\n")
    assert cli.main(["submit", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    resolved = json.loads(out)
    assert "s3cr3t-value" not in out and "literal-t0ken" not in out
    assert resolved["runtime_env"]["env_vars"] == {"AWS_SECRET_ACCESS_KEY": "${MY_SECRET_KEY}", "API_TOKEN": "****",
                                                   "HF_HUB_OFFLINE": "1"}
    assert resolved["entrypoint"].startswith("python -m jobs.run ")
    assert resolved["options"]["model"] == "tiny-random"
    spec = load_spec(path)
    assert spec.ray_runtime_env()["env_vars"]["AWS_SECRET_ACCESS_KEY"] == "s3cr3t-value"  # what Ray gets


def test_an_unset_env_reference_is_refused_before_submission(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    path = write(tmp_path, GOOD + "runtime_env: {env_vars: {AWS_SECRET_ACCESS_KEY: '${NOT_SET_ANYWHERE}'}}\n")
    assert cli.main(["submit", str(path), "--address", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err.strip()
    assert "NOT_SET_ANYWHERE" in err and "not set" in err and "\n" not in err


def test_bad_spec_is_refused_before_contacting_any_cluster(tmp_path, capsys):
    path = write(tmp_path, GOOD + "resources: {actors: -2}\n")
    # port 9 (discard) has nothing listening: reaching the connect step would give another message
    assert cli.main(["submit", str(path), "--address", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"diffseg submit: error: {path}: resources.actors: must be an integer >= 1, not -2."


def test_no_address_is_one_sentence(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    assert cli.main(["status", "some-job"]) == 2
    assert capsys.readouterr().err.strip() == (
        "diffseg status: error: No Ray cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS.")
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265/")
    assert resolve_address(None) == "http://head:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://jobs:8265")  # Ray's `ray job` order
    assert resolve_address(None) == "http://jobs:8265" and resolve_address("http://x:1") == "http://x:1"


def test_unreachable_cluster_is_one_sentence(tmp_path, capsys):
    assert cli.main(["list", "--address", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("diffseg list: error: Cannot reach the Ray job server at http://127.0.0.1:9") and "\n" not in err


def test_token_sources_follow_rays_order_and_never_show_the_value(tmp_path):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-home\n")
    (tmp_path / "tok").write_text("from-path\n")
    env = {"HOME": str(home)}
    assert find_token(env).value == "from-home"
    assert find_token({**env, "RAY_AUTH_TOKEN_PATH": str(tmp_path / "tok")}).value == "from-path"
    token = find_token({**env, "RAY_AUTH_TOKEN_PATH": str(tmp_path / "tok"), "RAY_AUTH_TOKEN": "from-env"})
    assert token.value == "from-env" and token.source == "RAY_AUTH_TOKEN" and "from-env" not in repr(token)
    assert find_token({**env, "RAY_AUTH_MODE": "disabled"}) is None
    assert find_token({"HOME": str(tmp_path / "nobody")}) is None
    with pytest.raises(ClusterError, match="RAY_AUTH_TOKEN_PATH names .*missing.*cannot be read"):
        find_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")})


def test_help_lists_pipeline_and_job_commands(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for command in ("label", "submit", "status", "logs", "stop", "list"):
        assert command in out


def test_other_commands_go_to_the_pipeline_cli_unchanged(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    assert cli.main(["label", str(tmp_path / "in"), str(tmp_path / "out"), "--model", "tiny-random"]) == 2
    assert capsys.readouterr().err.startswith("diffseg label: error: No input matched")


def test_pyproject_script_points_at_the_job_cli():
    import tomllib

    pyproject = tomllib.loads((JOBS_DIR.parent / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["diffseg"] == "jobs.cli:main"


@pytest.mark.parametrize("a, b", [("/data/out/", "/data/out"), ("file:///data/out", "/data/out"),
                                  ("S3://bucket//labels/", "s3://bucket/labels"), ("/data/./out", "/data/out")])
def test_one_output_has_one_spelling(a, b):
    assert normalize_output(a) == normalize_output(b)


def test_jobs_run_refuses_a_bad_spec_with_one_sentence(capsys):
    from jobs.run import main

    assert main(['{"input": "/x", "output": "/y", "method": {"num_points": 0}}']) == 2
    err = capsys.readouterr().err.strip()
    assert err == "diffseg job: error: <job spec>: method.num_points: must be an integer >= 1, not 0."


def test_method_parameters_diffseg_refuses_are_refused_before_submission(tmp_path):
    # The spec's own checks allow num_points 1; DiffSeg needs a grid of at least 2 x 2.
    path = write(tmp_path, GOOD + "method: {num_points: 1}\n")
    with pytest.raises(SpecError) as err:
        load_spec(path)
    message = str(err.value)
    assert message.startswith(f"{path}: DiffSeg parameters: num_points must be an integer >= 2")
    assert "\n" not in message


def test_an_example_spec_adapted_by_its_model_alone_leaves_the_method_to_the_model(tmp_path, capsys):
    """jobs/local-folder.yaml with only `model:` changed: tiny-demo's own defaults apply, and the dry run
    says which values come from the spec and which from the model card."""
    text = (JOBS_DIR / "local-folder.yaml").read_text()
    adapted = text.replace("name: CompVis/stable-diffusion-v1-4", "name: tiny-demo", 1)
    assert adapted != text
    spec = load_spec(write(tmp_path, adapted))
    assert not {"kl_threshold", "num_points", "iterations", "weights"} & set(spec.options)
    assert cli.main(["submit", str(write(tmp_path, adapted + "method: {num_points: 4}\n", "b.yaml")), "--dry-run"]) == 0
    method = json.loads(capsys.readouterr().out)["method"]
    from diffseg_core.method_defaults import model_method_defaults

    card = model_method_defaults("tiny-demo")
    assert method["num_points"] == {"value": 4, "from": "spec"}
    assert method["kl_threshold"] == {"value": card["kl_threshold"], "from": "model card (tiny-demo)"}
    assert method["weights"] == {"value": card["weights"], "from": "model card (tiny-demo)"}
    assert method["refine"] == {"value": False, "from": "default"}


def test_a_dry_run_piped_into_head_ends_quietly(tmp_path):
    import subprocess
    import sys

    spec = write(tmp_path, GOOD)
    # `true` has exited long before Python starts writing: every write meets a closed pipe
    done = subprocess.run(f"{sys.executable} -m jobs.cli submit {spec} --dry-run | true", shell=True,
                          capture_output=True, text=True, cwd=JOBS_DIR.parent, timeout=120)
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr


def test_submit_parts_dry_run_resolves_one_job_per_part(tmp_path, capsys):
    path = write(tmp_path, GOOD + "name: big\n")
    assert cli.main(["submit", str(path), "--parts", "3", "--dry-run"]) == 0
    jobs = json.loads(capsys.readouterr().out)
    assert [j["name"] for j in jobs] == ["big-part-1-of-3", "big-part-2-of-3", "big-part-3-of-3"]
    assert [j["options"]["part"] for j in jobs] == ["1/3", "2/3", "3/3"]
    assert len({j["submission_id_prefix"] for j in jobs}) == 3
    import shlex

    for job in jobs:  # what the cluster's `python -m jobs.run` reads back: the part travels in the entrypoint
        entry = json.loads(shlex.split(job["entrypoint"])[-1])
        assert parse_spec(entry).options["part"] == job["options"]["part"]
    assert cli.main(["submit", str(path), "--parts", "1", "--dry-run"]) == 2
    assert "--parts takes a number of jobs from 2 to 9999" in capsys.readouterr().err
    spec_part = write(tmp_path, GOOD + "io: {part: 1/2}\n", "p.yaml")
    assert cli.main(["submit", str(spec_part), "--parts", "2", "--dry-run"]) == 2
    assert "already sets io.part: 1/2" in capsys.readouterr().err
    with pytest.raises(SpecError, match=r"io.part: must be i/N"):
        parse_spec({"input": "/in", "output": "/out", "model": "tiny-random", "io": {"part": "3/2"}})


@pytest.mark.parametrize("mine, theirs, allowed", [
    ("1/2", "2/2", True), ("1/2", "1/2", False), ("1/2", "", False), ("", "1/2", False), ("", "", False),
    ("1/2", "2/3", False),
])
def test_only_other_parts_of_the_same_n_share_an_output(mine, theirs, allowed):
    from jobs.submit import _other_parts

    assert _other_parts(mine, theirs) is allowed

"""A secret is never echoed (issue 16, point 4) and pickle weights need an explicit flag (point 6).

Each case is checked where a secret could surface: stdout and stderr (file descriptors,
so Ray's and subprocesses' output counts too), the manifest, every Parquet file's
key-value metadata, and every file under Ray's session log folder.
"""
from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from pipeline_helpers import make_photo_folder

from jobs import cli as jobs_cli
from jobs.spec import SpecError, load_spec
from pipeline.data.credentials import MASK, looks_secret, url_credential_problem

GOOD = "input: /data/in\noutput: /data/out\nmodel: tiny-random\n"


def _secret() -> str:
    return f"S3CR3T-{uuid.uuid4().hex}"  # unique: other tests' logs cannot hold it


def _ray_log_texts() -> list[str]:
    """Every file under this Ray session's log folder (found through Ray's runtime context)."""
    import ray

    ctx = ray.get_runtime_context()
    logs = Path(ctx.get_temp_dir()) / ctx.get_session_name() / "logs"
    assert logs.is_dir(), logs
    texts = []
    for path in logs.rglob("*"):
        if path.is_file():
            texts.append(path.read_bytes().decode("utf-8", "replace"))
    assert texts
    return texts


def _written_texts(out: Path) -> list[str]:
    """The manifest, the bookkeeping files and every Parquet file's key-value metadata under ``out``."""
    texts = [p.read_text() for p in out.rglob("*.json")]
    for part in out.glob("*.parquet"):
        meta = pq.read_schema(part).metadata or {}
        texts.extend(k.decode() + v.decode("utf-8", "replace") for k, v in meta.items())
    assert any("diffseg" in t for t in texts)
    return texts


@pytest.mark.parametrize("command", [
    ["label", "IN", "OUT"],
    ["export", "LABELS", "--to", "png", "DEST"],
    ["show", "LABELS", "--images", "IN", "--out", "DEST"],
])
@pytest.mark.parametrize("bad", ['{"secret": "SECRET", oops}', '["SECRET"]', "SECRET"])
def test_a_malformed_storage_options_value_is_never_printed_back(command, bad, capfd):
    secret = _secret()
    with pytest.raises(SystemExit) as exit_:
        jobs_cli.main([*command, "--storage-options", bad.replace("SECRET", secret)])
    assert exit_.value.code == 2
    out, err = capfd.readouterr()
    assert secret not in out + err
    assert "--storage-options takes a JSON object" in err and ("not valid JSON" in err or "is a JSON " in err)


def test_secret_names_and_url_credentials_are_recognised():
    for name in ("HF_TOKEN", "DB_PASS", "APIKEY", "AccessKeyId", "SecretAccessKey", "aws_secret_access_key",
                 "x-api-key", "sas_token", "connection_string", "account_key", "key", "secret", "token"):
        assert looks_secret(name), name
    for name in ("endpoint_url", "region_name", "signature_version", "anon", "profile", "use_ssl", "client_kwargs"):
        assert not looks_secret(name), name
    for url in ("http://KEY:SECRET@host:9000", "postgres://u:PW@db/x", "https://a.blob.core.windows.net/c?sv=1&sig=x",
                "https://b.s3.amazonaws.com/k?X-Amz-Signature=1"):
        assert url_credential_problem(url), url
    for url in ("http://127.0.0.1:9000", "s3://bucket/x", "abfs://container@account.dfs.core.windows.net/x"):
        assert url_credential_problem(url) is None, url


@pytest.mark.parametrize("where", ["endpoint", "input", "output"])
def test_credentials_in_a_url_are_refused_before_any_work(where, tmp_path, capfd):
    secret = _secret()
    src, out = str(tmp_path / "in"), str(tmp_path / "out")
    options = ["--model", "tiny-random"]
    if where == "endpoint":
        options += ["--storage-options", json.dumps({"client_kwargs": {"endpoint_url": f"http://AK:{secret}@h:9"}})]
    elif where == "input":
        src = f"http://AK:{secret}@127.0.0.1:9/images/"
    else:
        out = f"http://AK:{secret}@127.0.0.1:9/labels/"
    assert jobs_cli.main(["label", src, out, *options]) == 2
    stdout, stderr = capfd.readouterr()
    assert secret not in stdout + stderr
    assert stderr.count("\n") == 1 and "password in it" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "out").exists()  # refused before the output was touched


def _spec(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return path


def test_dry_run_masks_every_env_value_but_references_and_harmless_settings(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("MY_TOKEN", "from-the-environment")
    secrets = {name: _secret() for name in ("HF_TOKEN", "DB_PASS", "APIKEY", "PLAIN")}
    env = {**secrets, "DATABASE_URL": f"postgres://u:{secrets['DB_PASS']}@db:5432/x",
           "AWS_ENDPOINT_URL": f"http://AK:{secrets['APIKEY']}@minio:9000", "OMP_NUM_THREADS": "4",
           "AWS_DEFAULT_REGION": "eu-west-1", "FROM_ENV": "${MY_TOKEN}"}
    custom = _secret()
    storage = {"client_kwargs": {"endpoint_url": "http://minio:9000"}, "custom_option": custom,
               "key": "${MY_TOKEN}"}
    path = _spec(tmp_path, json.dumps({"input": "/data/in", "output": "/data/out", "model": "tiny-random",
                                       "runtime_env": {"env_vars": env}, "io": {"storage_options": storage}}))
    assert jobs_cli.main(["submit", str(path), "--dry-run"]) == 0
    out, err = capfd.readouterr()
    for value in [*secrets.values(), custom, "from-the-environment"]:
        assert value not in out + err
    shown = json.loads(out)
    assert shown["runtime_env"]["env_vars"] == {
        "HF_TOKEN": MASK, "DB_PASS": MASK, "APIKEY": MASK, "PLAIN": MASK, "DATABASE_URL": MASK,
        "AWS_ENDPOINT_URL": MASK, "OMP_NUM_THREADS": "4", "AWS_DEFAULT_REGION": "eu-west-1", "FROM_ENV": "${MY_TOKEN}"}
    assert shown["options"]["storage_options"] == {"client_kwargs": {"endpoint_url": "http://minio:9000"},
                                                   "custom_option": MASK, "key": "${MY_TOKEN}"}
    assert "http://minio:9000" in shown["entrypoint"]
    spec = load_spec(path)  # what is submitted is unmasked: Ray gets the real values
    assert spec.ray_runtime_env()["env_vars"]["DB_PASS"] == secrets["DB_PASS"]
    assert spec.options["storage_options"]["custom_option"] == custom


@pytest.mark.parametrize("section, key", [
    ({"io": {"storage_options": {"AccessKeyId": "SECRET"}}}, "io.storage_options.AccessKeyId"),
    ({"io": {"storage_options": {"client_kwargs": {"aws_secret_access_key": "SECRET"}}}},
     "io.storage_options.client_kwargs.aws_secret_access_key"),
    ({"io": {"storage_options": {"client_kwargs": {"endpoint_url": "http://AK:SECRET@minio:9000"}}}},
     "io.storage_options.client_kwargs.endpoint_url"),
    ({"io": {"storage_options": {"endpoint_url": "https://h/x?X-Amz-Signature=SECRET"}}},
     "io.storage_options.endpoint_url"),
    ({"input": "s3://AK:SECRET@bucket/in/"}, "input"),
    ({"runtime_env": {"pip": ["git+https://me:SECRET@git.example.com/pkg.git"]}}, "runtime_env.pip[0]"),
])
def test_specs_with_credentials_where_they_would_be_shown_are_refused(section, key, tmp_path, capfd):
    secret = _secret()
    data = {"input": "/data/in", "output": "/data/out", "model": "tiny-random", **section}
    path = _spec(tmp_path, json.dumps(data).replace("SECRET", secret))
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert str(err.value).startswith(f"{path}: {key}: ") and secret not in str(err.value)
    assert jobs_cli.main(["submit", str(path), "--dry-run"]) == 2
    out, err_text = capfd.readouterr()
    assert secret not in out + err_text and key in err_text


def test_a_cluster_address_with_a_password_is_refused_unechoed(tmp_path, capfd, monkeypatch):
    secret = _secret()
    monkeypatch.setenv("RAY_ADDRESS", f"http://admin:{secret}@127.0.0.1:9")
    assert jobs_cli.main(["status", "some-job"]) == 2
    out, err = capfd.readouterr()
    assert secret not in out + err and "password in it" in err and err.count("\n") == 1


# ---------------------------------------------------------------------------------- pickle weights


@pytest.fixture(scope="module")
def pickle_model(tiny_model_path, tmp_path_factory) -> Path:
    """The tiny random model with its UNet saved as pickle (.bin) only."""
    from diffusers import UNet2DConditionModel

    folder = tmp_path_factory.mktemp("pickle") / "bin-only"
    shutil.copytree(tiny_model_path, folder)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    shutil.rmtree(folder / "unet")
    unet.save_pretrained(folder / "unet", safe_serialization=False)
    assert not list((folder / "unet").glob("*.safetensors"))
    return folder


def test_pickle_weights_are_refused_with_the_flag_named(pickle_model, ray_session, tmp_path, capfd):
    make_photo_folder(tmp_path / "in")
    argv = ["label", str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(pickle_model), "--image-size", "64",
            "--num-points", "4"]
    assert jobs_cli.main(argv) == 2
    err = capfd.readouterr().err
    assert "--allow-unsafe-weights" in err and "allow_unsafe_weights: true" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "_manifest.json").exists()


def test_a_label_run_records_unsafe_weights_and_never_its_storage_options(pickle_model, ray_session, tmp_path,
                                                                          capfd):
    """One real run for both: --allow-unsafe-weights reaches the actors and the manifest, and the
    --storage-options values (a local folder takes and ignores them) reach no output and no log."""
    from pipeline.job.options import LabelOptions

    secret = _secret()
    make_photo_folder(tmp_path / "in")
    out = tmp_path / "out"
    argv = ["label", str(tmp_path / "in"), str(out), "--model", str(pickle_model), "--image-size", "64",
            "--num-points", "4", "--batch-size", "4", "--allow-unsafe-weights", "--json",
            "--storage-options", json.dumps({"secret": secret, "key": "AKIA-" + secret})]
    assert jobs_cli.main(argv) == 0  # the actors loaded the pickle UNet too: every row is labelled
    stdout, stderr = capfd.readouterr()
    summary = json.loads(stdout)
    assert summary["complete"] and summary["labelled"] == summary["images"] > 0
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["parameters"]["allow_unsafe_weights"] is True
    # off (the default) is not recorded: outputs made before the flag existed stay resumable
    assert "allow_unsafe_weights" not in LabelOptions().label_parameters(64, "fp32")

    ray_logs = _ray_log_texts()
    assert any("LabelActor" in t for t in ray_logs)  # the scan reads the model actors' own logs
    for text in [stdout, stderr, *_written_texts(out), *ray_logs]:
        assert secret not in text


def test_the_spec_key_turns_the_flag_on(tmp_path):
    spec = load_spec(_spec(tmp_path, GOOD.replace("model: tiny-random\n", "")
                           + "model: {name: /models/sd, allow_unsafe_weights: true}\n"))
    assert spec.options["allow_unsafe_weights"] is True
    assert "allow_unsafe_weights" not in load_spec(_spec(tmp_path, GOOD)).options
    with pytest.raises(SpecError, match="model.allow_unsafe_weights: must be true or false"):
        load_spec(_spec(tmp_path, GOOD.replace("model: tiny-random\n", "")
                        + "model: {name: /models/sd, allow_unsafe_weights: 'yes'}\n"))



def test_eval_baselines_reuse_the_labels_opt_in_for_their_own_model_only():
    from pipeline.after.baselines import extractor_settings

    manifest = {"model": {"model": "/models/sd-bin"}, "parameters": {"image_size": 64, "allow_unsafe_weights": True}}
    assert extractor_settings(manifest, None, None)["allow_unsafe_weights"] is True
    assert extractor_settings(manifest, "/models/other", None)["allow_unsafe_weights"] is False
    assert extractor_settings({"model": {"model": "m"}, "parameters": {}}, None, None)["allow_unsafe_weights"] is False

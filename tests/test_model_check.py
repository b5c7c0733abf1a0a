"""The driver's model check: configs, file list and safetensors headers only; no weights, no torch needed."""
from __future__ import annotations

import inspect
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from diffseg_core.model_check import (
    UNET_DEFAULTS,
    ModelLoadError,
    check_model,
    read_safetensors_header,
    self_attention_layer_count,
)
from diffseg_core.weight_hashes import hash_cache_path, sha256_files

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("variant", ["sd1", "sdxl"])
@pytest.mark.parametrize("image_size", [None, 64])
def test_provenance_from_configs_equals_the_loaded_models(variant, image_size, request):
    from diffseg_core.extract import AttentionExtractor

    path = request.getfixturevalue("tiny_model_path" if variant == "sd1" else "tiny_sdxl_model_path")
    check = check_model(str(path))
    size = check.image_size(image_size)
    info = check.model_info(dtype="fp32", timestep=300, image_size=size, device="cpu",
                            weights_sha256=sha256_files(list(check.weight_files)))
    loaded = AttentionExtractor.from_pretrained(str(path), device="cpu", dtype="fp32", image_size=image_size)
    assert info == loaded.model_info  # the manifest's model is the same whether checked or loaded
    assert info["self_attention_layers"] == len(loaded.layer_names)


def test_unet_defaults_are_diffusers_defaults():
    from diffusers import UNet2DConditionModel

    signature = inspect.signature(UNet2DConditionModel.__init__).parameters
    for key, value in UNET_DEFAULTS.items():
        assert signature[key].default == value, key


def test_sd14_layer_count_from_its_config():
    # SD 1.4's unet/config.json leaves mid_block_type and transformer_layers_per_block to the defaults.
    config = {"down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
              "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "layers_per_block": 2}
    assert self_attention_layer_count(config) == 16  # 64 (5), 32 (5), 16 (5), 8 (1): DESIGN.md


def test_a_made_up_path_and_missing_parts_are_one_sentence(tiny_model_path, tmp_path):
    with pytest.raises(ModelLoadError, match="no such file or folder"):
        check_model(str(tmp_path / "no-such-model"))
    broken = tmp_path / "no-vae"
    shutil.copytree(tiny_model_path, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(ModelLoadError, match="has no 'vae' subfolder"):
        check_model(str(broken))


def test_a_truncated_safetensors_file_is_caught_without_loading(tiny_model_path, tmp_path):
    model = tmp_path / "truncated"
    shutil.copytree(tiny_model_path, model)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    read_safetensors_header(weights)  # the intact file passes
    weights.write_bytes(data[: len(data) - 100])
    with pytest.raises(ModelLoadError, match=r"unet/diffusion_pytorch_model.safetensors: truncated"):
        check_model(str(model))


def test_pickle_only_weights_are_refused_unless_allowed(tiny_model_path, tmp_path):
    model = tmp_path / "pickled"
    shutil.copytree(tiny_model_path, model)
    (model / "vae" / "diffusion_pytorch_model.safetensors").rename(model / "vae" / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="only pickle weights"):
        check_model(str(model))
    assert check_model(str(model), allow_unsafe_weights=True).source == "folder"


def test_weight_hashes_are_computed_once_per_file(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFSEG_CACHE", str(tmp_path / "cache"))
    weights = tmp_path / "unet" / "w.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"a" * 1000)
    first = sha256_files([str(weights)])
    assert json.loads(hash_cache_path().read_text())  # remembered
    stat = weights.stat()
    weights.write_bytes(b"b" * 1000)  # same size; put the old mtime back: the cache must answer
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert sha256_files([str(weights)]) == first
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a new mtime: hashed again
    assert sha256_files([str(weights)]) != first


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("offline", [True, False])
def test_the_default_model_without_network_fails_at_once_naming_the_fixes(offline, tmp_path):
    # In a fresh process: huggingface_hub reads HF_HUB_OFFLINE and HF_ENDPOINT when imported.
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HOME": str(tmp_path / "hf"),
           "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"}  # nothing listens there: connection refused
    env.pop("HF_HUB_OFFLINE", None)
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    code = ("from diffseg_core.model_check import check_model, ModelLoadError\n"
            "try:\n    check_model('CompVis/stable-diffusion-v1-4')\n"
            "except ModelLoadError as exc:\n    print(exc.what)\n")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    message = done.stdout.strip()
    assert "\n" not in message and "--model tiny-random" in message and "HF_HUB_OFFLINE=1" in message
    assert "diffusers-folder" in message
    assert ("HF_HUB_OFFLINE is set" if offline else "cannot be reached") in message
    assert "Retrying" not in done.stderr  # one request, no retry loop

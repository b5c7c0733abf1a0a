"""Cheap checks finish before Ray starts: a wrong path, a bad option or a changed parameter costs a second.

Each case runs `diffseg label` in a fresh interpreter and reports whether Ray (or torch) was even
imported: a refusal that never imports Ray cannot have waited for Ray's start-up.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import label
from pipeline_helpers import make_photo_folder

REPO = Path(__file__).resolve().parents[1]
PROBE = """
import json, sys
from pipeline.cli import main
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "ray": "ray" in sys.modules, "torch": "torch" in sys.modules}))
"""


def _run(*argv: str, env: dict | None = None) -> tuple[dict, str]:
    done = subprocess.run([sys.executable, "-c", PROBE, "label", *argv], capture_output=True, text=True,
                          timeout=300, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", **(env or {})})
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr.strip()


def _last_line(err: str) -> str:
    assert "Traceback" not in err
    return err.splitlines()[-1]


def test_a_made_up_model_path_fails_before_ray_is_even_imported(tmp_path):
    make_photo_folder(tmp_path / "in")
    result, err = _run(str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(tmp_path / "no-such-model"))
    assert result == {"rc": 2, "ray": False, "torch": False}
    assert _last_line(err) == (f"diffseg label: error: Cannot load model '{tmp_path / 'no-such-model'}': "
                               "no such file or folder.")
    assert not (tmp_path / "out").exists()


def test_a_bad_option_fails_before_ray(tmp_path):
    make_photo_folder(tmp_path / "in")
    result, err = _run(str(tmp_path / "in"), str(tmp_path / "out"), "--model", "tiny-random", "--num-points", "1")
    assert result == {"rc": 2, "ray": False, "torch": False}
    assert _last_line(err) == "diffseg label: error: DiffSeg parameters: num_points must be an integer >= 2, got 1."
    result, err = _run(str(tmp_path / "in"), str(tmp_path / "out"), "--device", "cpu", "--gpus-per-actor", "1")
    assert result["rc"] == 2 and not result["ray"]
    assert _last_line(err) == ("diffseg label: error: --device cpu and --gpus-per-actor 1 contradict each other; "
                               "drop one.")


def test_the_offline_default_model_fails_before_ray_and_leaves_no_output_folder(tmp_path):
    make_photo_folder(tmp_path / "in")
    result, err = _run(str(tmp_path / "in"), str(tmp_path / "labels"), env={"HF_HOME": str(tmp_path / "hf")})
    assert result == {"rc": 2, "ray": False, "torch": False}
    line = _last_line(err)
    assert line.startswith("diffseg label: error: Cannot load model 'CompVis/stable-diffusion-v1-4': it is not")
    assert "--model tiny-random" in line and "HF_HUB_OFFLINE=1" in line
    assert line.count("Cannot load") == 1  # the prefix is not repeated
    assert not (tmp_path / "labels").exists()


def test_no_input_matched_leaves_no_output_folder(tmp_path, tiny_model_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    result, err = _run(str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(tiny_model_path))
    assert result == {"rc": 2, "ray": False, "torch": False}
    assert _last_line(err).startswith("diffseg label: error: No input matched")
    assert not (tmp_path / "out").exists()


def test_a_rerun_with_a_changed_parameter_or_model_is_refused_before_ray(ray_session, tmp_path, tiny_model_path):
    src, out, model = tmp_path / "in", tmp_path / "out", tmp_path / "model"
    make_photo_folder(src)
    shutil.copytree(tiny_model_path, model)
    assert label(str(src), str(out), model=str(model), image_size=64, num_points=4, batch_size=4)["complete"]
    args = ["--model", str(model), "--image-size", "64", "--num-points", "4"]
    result, err = _run(str(src), str(out), *args, "--kl-threshold", "0.5")
    assert result == {"rc": 2, "ray": False, "torch": False}
    assert "holds labels made with different settings (kl_threshold 1.1 -> 0.5)" in _last_line(err)
    # Other weights in the same folder (same size, so only their sha256 tells): refused too, before Ray.
    weights = model / "vae" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4:] = bytes(4)
    weights.write_bytes(bytes(data))
    result, err = _run(str(src), str(out), *args)
    assert result == {"rc": 2, "ray": False, "torch": False}
    assert "different settings (model weights_sha256 differs)" in _last_line(err)


@pytest.mark.parametrize("device", ["gpu", "auto"])
def test_device_options_reach_label(device):
    from pipeline.cli import build_parser

    args = build_parser().parse_args(["label", "in", "out", "--device", device, "--gpu-wait", "5"])
    assert args.device == device and args.gpu_wait_s == 5.0


def test_a_single_file_checkpoint_is_probed_in_a_ray_task_not_in_the_driver(ray_session, tmp_path):
    """A .safetensors checkpoint's configs only a load reveals: its header is checked before Ray, the load
    happens in a Ray task, and its failure is still one sentence."""
    import torch
    from safetensors.torch import save_file

    from pipeline import LabelError

    make_photo_folder(tmp_path / "in")
    checkpoint = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4)}, str(checkpoint))
    with pytest.raises(LabelError) as caught:
        label(str(tmp_path / "in"), str(tmp_path / "out"), model=str(checkpoint), num_points=4)
    message = str(caught.value)
    assert message.startswith(f"Cannot load model '{checkpoint}': ") and "single-file checkpoint" in message
    assert "\n" not in message
    checkpoint.write_bytes(checkpoint.read_bytes()[:-2])  # cut short: caught by the header check, before Ray
    result, err = _run(str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(checkpoint))
    assert result == {"rc": 2, "ray": False, "torch": False}
    assert "not a readable .safetensors file (truncated or padded" in _last_line(err)

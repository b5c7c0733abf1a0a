"""The driver's peak memory during a labeling run with a full-size SD 1.x model: now against before.

The model is SD 1.4's architecture (its UNet, VAE and CLIP text encoder configs) with
RANDOM weights, saved once as a diffusers folder (4.2 GB of float32 safetensors) under
``$DIFFSEG_CACHE/sd14-random``; only the tokenizer is a small stand-in (no vocabulary
can be downloaded here). Each measurement runs in a fresh process and reports its own
peak RSS (``VmHWM``: the driver alone, not Ray's processes or the model actors):

- now: ``pipeline.label`` on two photographs, the whole run (local Ray, one CPU model
  actor at 512 px), with a cold weight-hash cache; then the same command again
  (a rerun: all done), whose checks reuse the cached hashes;
- before: the same run with the driver code as it was (commit ``--before-commit``, taken out
  with ``git archive``), which loaded the model on CPU in the driver for its "model check";
  and that check alone (``AttentionExtractor.from_pretrained`` + ``model_info``).

    python benchmarks/driver_rss_bench.py            # goal: now < 600 MB
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

GOAL_MB = 600
BEFORE_COMMIT = "ca6f628"  # main before the driver stopped loading the model


def build_model(path: Path) -> Path:
    """SD 1.4's architecture with random weights, as a complete diffusers folder."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from benchmarks.extract_bench import build_sd14_architecture
    from diffseg_core.tiny_model import _write_tokenizer_source

    if (path / "model_index.json").is_file():
        return path
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    loaded = build_sd14_architecture()
    torch.manual_seed(1)
    vae = AutoencoderKL.from_config(loaded.vae.config)  # with its decoder, as a saved model has one
    _write_tokenizer_source(tmp / "tokenizer-src")
    tokenizer = CLIPTokenizer.from_pretrained(tmp / "tokenizer-src")
    text_encoder = CLIPTextModel(CLIPTextConfig(  # SD 1.4's text_encoder/config.json
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, bos_token_id=0, eos_token_id=1,
        pad_token_id=1))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=loaded.unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(tmp / "tokenizer-src")
    os.rename(tmp, path)
    return path


# VmHWM, this process's own peak RSS (ru_maxrss would carry over the parent's peak across exec).
PEAK = """
def peak_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
"""

NOW = PEAK + """
import json, sys, time
from pipeline import label
summary = label(sys.argv[1], sys.argv[2], model=sys.argv[3], rows_per_file=2, batch_size=1, actors=1)
print(json.dumps({"peak_mb": peak_mb(), "checks_s": summary["stage_seconds"]["checks"],
                  "images": summary["this_run"]["images"], "seconds": summary["seconds"]}))
"""

BEFORE = PEAK + """
import json, sys, time
start = time.perf_counter()
from diffseg_core.extract import AttentionExtractor
info = AttentionExtractor.from_pretrained(sys.argv[1], device="cpu", dtype="fp32").model_info
print(json.dumps({"peak_mb": peak_mb(), "checks_s": time.perf_counter() - start}))
"""


def measure(code: str, *args: str, env: dict, cwd: Path = REPO) -> dict:
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=cwd)
    if done.returncode:
        raise SystemExit(f"failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=None, help="where to keep the random SD 1.4 folder")
    parser.add_argument("--before-commit", default=BEFORE_COMMIT, help="the driver code to compare with")
    args = parser.parse_args()
    from diffseg_core.weight_hashes import diffseg_cache_dir
    from pipeline_helpers import make_photo_folder

    model = build_model(args.model_dir or diffseg_cache_dir() / "sd14-random")
    size_gb = sum(p.stat().st_size for p in model.rglob("*.safetensors")) / 1e9
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        make_photo_folder(work / "in")
        images = work / "in" / "set0"
        (images / "coffee-0.png").unlink()  # two photographs: astronaut, chelsea
        env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "DIFFSEG_CACHE": str(work / "cache")}
        now = measure(NOW, str(images), str(work / "out"), str(model), env=env)
        again = measure(NOW, str(images), str(work / "out"), str(model), env=env)
        check_only = measure(BEFORE, str(model), env=env)
        old_tree = work / "before"
        old_tree.mkdir()
        subprocess.run(f"git archive {args.before_commit} | tar -x -C {old_tree}", shell=True, check=True, cwd=REPO)
        old_env = {**env, "PYTHONPATH": str(old_tree)}
        before = measure(NOW.replace(', "checks_s": summary["stage_seconds"]["checks"]', ', "checks_s": '
                                     'summary["stage_seconds"]["model check"]'),
                         str(images), str(work / "out-before"), str(model), env=old_env, cwd=old_tree)
    print(json.dumps({"now": now, "rerun": again, "before": before, "before_check_only": check_only}))
    print(f"\nSD 1.4 architecture, random weights ({size_gb:.2f} GB safetensors), {platform.machine()}, "
          f"{os.cpu_count()} CPUs")
    print(f"  before: driver peak RSS {before['peak_mb']:7.0f} MB over the whole run (commit {args.before_commit}: "
          f"model loaded in the driver for its check, {before['checks_s']:.1f} s; that load alone peaks at "
          f"{check_only['peak_mb']:.0f} MB)")
    print(f"  now:    driver peak RSS {now['peak_mb']:7.0f} MB over the whole run ({now['images']} images, "
          f"{now['seconds']:.0f} s; checks {now['checks_s']:.1f} s with a cold hash cache), goal < {GOAL_MB} MB: "
          f"{'met' if now['peak_mb'] < GOAL_MB else 'NOT met'}")
    print(f"  rerun:  driver peak RSS {again['peak_mb']:7.0f} MB, checks {again['checks_s']:.2f} s (hashes cached)")
    print(f"  before / now: {before['peak_mb'] / now['peak_mb']:.1f}x")


if __name__ == "__main__":
    main()

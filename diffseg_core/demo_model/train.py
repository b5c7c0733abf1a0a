"""Train tiny-demo from scratch on CPU: ``python -m diffseg_core.demo_model.train [--out DIR]``.

A small Stable-Diffusion-shaped model (AutoencoderKL with SD's 8x downsampling,
UNet2DConditionModel with self-attention at three resolutions, a tiny CLIP
text encoder and tokenizer) trained the way SD was, at toy scale:

1. the VAE as an autoencoder (L1 reconstruction + a small KL term) on random
   crops of synthetic scenes (``scenes.make_scene``, training seeds only) and
   of the photos bundled with scikit-image;
2. the pool of scenes and photo crops encoded once (posterior mean), and
   ``scaling_factor`` set so the latents have unit variance, as SD's 0.18215;
3. the UNet as an epsilon-predicting denoiser on those latents (SD's
   scaled-linear DDPM schedule), conditioned on the empty prompt's embedding
   from the text encoder (whose weights stay at their seeded initialisation:
   DiffSeg only ever feeds it the empty prompt).

Nothing in the loss mentions segments: self-attention groups pixels of the same
region because attending to similar pixels is how a denoiser averages noise
away. Everything is seeded and single-process, with a fixed thread count, so a
rerun with the same settings on the same machine writes the same weights.
The default settings take about 17-19 minutes on one quiet CPU core; the script
prints wall and process CPU time and the load average for each stage.

The output is a diffusers folder (``StableDiffusionPipeline``, safetensors)
plus ``diffseg.json`` (the model card: a demo, not Stable Diffusion; the
DiffSeg defaults that suit it) and ``training.json`` (settings, losses, times).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from diffseg_core.demo_model.scenes import TRAIN_SEEDS, make_scene
from diffseg_core.model_check import MODEL_CARD
from diffseg_core.tiny_model import TINY_DEMO, save_sd1_pipeline, tiny_demo_path, tiny_text_encoder

__all__ = ["TrainConfig", "train", "main"]

DESCRIPTION = (
    "tiny-demo is a demo model trained for minutes on synthetic scenes (coloured, textured shapes) "
    "and a few scikit-image photos, not Stable Diffusion: its segments show the pipeline working "
    "end to end, not the quality of DiffSeg with real Stable Diffusion weights."
)
# DiffSeg defaults that suit tiny-demo, chosen on 100 validation scenes (HELD_OUT_SEEDS[50000:],
# apart from the test's and the benchmark's). Aggregation weights, finest first (32, 16, 8 px of
# latent): the 16 px maps count double, and the 8 x 8 maps are left out, too coarse to place an
# edge in a 256 px picture (0.690 mIoU there at tau 1.5, against 0.637 at the paper's proportional weights).
# PAMR on (the PAMR paper's 10 iterations and dilations): 0.697 -> 0.843 mIoU, 0.894 -> 0.961 pixel
# accuracy on 50 validation scenes (BENCHMARKS.md, "Boundaries").
DEMO_DEFAULTS = {"kl_threshold": 1.5, "num_points": 8, "iterations": 2, "weights": [1.0, 2.0, 0.0], "boundaries": "pamr"}
PHOTOS = (  # scikit-image's bundled photos that need no download (pooch)
    "astronaut", "camera", "cat", "coffee", "coins", "rocket", "moon", "brick", "grass", "gravel",
    "immunohistochemistry", "hubble_deep_field", "colorwheel", "clock", "cell", "page", "text",
)


@dataclass
class TrainConfig:
    seed: int = 0
    image_size: int = 256  # native size
    vae_blocks: int = 4  # the VAE downsamples by 2 ** (blocks - 1): 4 blocks = SD's 8x (latents 32 x 32 at 256 px)
    vae_scenes: int = 300  # synthetic scenes the VAE trains on (random crops; plus photo crops)
    scenes: int = 600  # synthetic scenes in the UNet's latent pool
    photo_crops: int = 100  # photo crops added to the UNet's latent pool
    photo_share: float = 0.25  # share of VAE crops taken from photos
    vae_steps: int = 1200
    vae_batch: int = 16
    vae_crop: int = 64
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-3
    unet_steps: int = 1500
    decoder_attention: bool = False  # self-attention in the UNet's last up block too (at the finest level), as SD's
    unet_batch: int = 32
    unet_crop: int = 16  # latent crops (side) the UNet trains on; its attention then runs on any size
    unet_lr: float = 2e-3
    qk_init_gain: float = 3.0  # self-attention starts with key = query projection, scaled: sharper, content-based
    qk_lr_scale: float = 3.0  # the self-attention query/key projections learn this much faster
    t_min: int = 100
    t_max: int = 900
    threads: int = 1  # the weights are reproducible for a given thread count (float sums change order)
    defaults: dict = dataclasses.field(default_factory=lambda: dict(DEMO_DEFAULTS))  # written to the model card

    @property
    def vae_factor(self) -> int:
        """The VAE's downsampling: image pixels per latent pixel, on each side."""
        return 2 ** (self.vae_blocks - 1)


def build_vae(image_size: int, blocks: int = 4):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(16, 32, 64, 64)[:blocks],  # 4 blocks: downsampling by 8, as SD's
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=image_size,
        mid_block_add_attention=False,  # fully convolutional: trained on crops, used on any size
    )


def build_unet(latent_size: int, text_dim: int, decoder_attention: bool = False):
    from diffusers import UNet2DConditionModel

    top = "CrossAttnUpBlock2D" if decoder_attention else "UpBlock2D"
    return UNet2DConditionModel(
        sample_size=latent_size,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", top),  # self-attention at 32, 16 and 8 (mid)
        cross_attention_dim=text_dim,
        attention_head_dim=(2, 4, 4),  # SD1 semantics: heads per block
        norm_num_groups=16,
    )


class _Clock:
    """Wall and process CPU seconds per stage, with the load average (the machine may be shared)."""

    def __init__(self, log: Callable[[str], None]):
        self.log = log
        self.stages: dict[str, dict[str, float]] = {}
        self._wall = time.perf_counter()
        self._cpu = time.process_time()

    def lap(self, stage: str) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        self.stages[stage] = {"wall_s": round(wall - self._wall, 1), "cpu_s": round(cpu - self._cpu, 1),
                              "load_avg_1min": round(load, 2)}
        self.log(f"{stage}: {wall - self._wall:.1f} s wall, {cpu - self._cpu:.1f} s CPU (load {load:.2f})")
        self._wall, self._cpu = wall, cpu


def _photos() -> list[np.ndarray]:
    import skimage.data

    out = []
    for name in PHOTOS:
        a = np.asarray(getattr(skimage.data, name)())
        if a.dtype == bool:
            a = a.astype(np.uint8) * 255
        if a.ndim == 2:
            a = np.repeat(a[:, :, None], 3, axis=2)
        out.append(np.ascontiguousarray(a[:, :, :3].astype(np.uint8)))
    return out


def _photo_crop(rng: np.random.Generator, photos: list[np.ndarray], size: int) -> np.ndarray:
    """A random square crop (40-100% of the short side) of a random photo, resized to size x size."""
    from PIL import Image

    a = photos[int(rng.integers(len(photos)))]
    h, w = a.shape[:2]
    side = int(rng.uniform(0.4, 1.0) * min(h, w))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = Image.fromarray(a[y : y + side, x : x + side]).resize((size, size), Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(crop)


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def _step(loss: torch.Tensor, opt: torch.optim.Optimizer, sched: Any) -> float:
    """One optimiser and schedule step on ``loss``; returns the loss as a float."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    return float(loss.detach())


def _empty_prompt(text_encoder, tokenizer) -> torch.Tensor:
    """(1, 77, D): the conditioning DiffSeg feeds the UNet (model_loading encodes it the same way)."""
    ids = tokenizer("", padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        return text_encoder(ids)[0].float()


def train(out: str | os.PathLike, config: TrainConfig = TrainConfig(), log: Callable[[str], None] | None = None) -> dict:
    """Train and write the tiny-demo folder to ``out``; return the training record."""
    cfg = config
    log = log or (lambda line: print(line, flush=True))
    factor = cfg.vae_factor
    if cfg.vae_blocks not in (3, 4) or cfg.image_size % factor or cfg.vae_crop % factor \
            or cfg.unet_crop > cfg.image_size // factor:
        raise ValueError("vae_blocks must be 3 or 4, image_size and vae_crop multiples of the VAE factor "
                         "(2 ** (vae_blocks - 1)), unet_crop at most image_size / that factor")
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    try:
        return _train(Path(out), cfg, log)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _train(out: Path, cfg: TrainConfig, log: Callable[[str], None]) -> dict:
    from diffusers import DDPMScheduler

    clock = _Clock(log)
    record: dict[str, Any] = {"config": dataclasses.asdict(cfg), "torch": torch.__version__}
    seeds = [TRAIN_SEEDS[(cfg.seed * 7919 + i) % len(TRAIN_SEEDS)] for i in range(max(cfg.vae_scenes, cfg.scenes))]
    photos = _photos()

    # 1. VAE, on random crops of scenes and photos
    scenes = np.stack([make_scene(s, cfg.image_size).image for s in seeds[: cfg.vae_scenes]])
    torch.manual_seed(cfg.seed)
    vae = build_vae(cfg.image_size, cfg.vae_blocks)
    vae_losses = _train_vae(vae, scenes, photos, np.random.default_rng(cfg.seed), cfg, log)
    vae.eval()
    clock.lap("vae")

    # 2. the UNet's latent pool: scenes and photo crops, encoded once (posterior mean), scaled to unit variance
    crops = np.random.default_rng(cfg.seed + 1)
    pool = [make_scene(s, cfg.image_size).image for s in seeds[: cfg.scenes]]
    pool += [_photo_crop(crops, photos, cfg.image_size) for _ in range(cfg.photo_crops)]
    with torch.no_grad():
        latents = torch.cat([vae.encode(_to_tensor(np.stack(pool[i : i + 32]))).latent_dist.mean
                             for i in range(0, len(pool), 32)])
    scaling = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling)
    latents = latents * scaling
    clock.lap("encode")

    # 3. UNet
    torch.manual_seed(cfg.seed)
    text_encoder, tokenizer = tiny_text_encoder()
    condition = _empty_prompt(text_encoder, tokenizer)
    unet = build_unet(cfg.image_size // cfg.vae_factor, condition.shape[-1], cfg.decoder_attention)
    ddpm = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    unet_losses = _train_unet(unet, latents, condition, ddpm, np.random.default_rng(cfg.seed), cfg, log)
    unet.eval()
    clock.lap("unet")

    # 4. write
    out.mkdir(parents=True, exist_ok=True)
    readme = (
        f"# {TINY_DEMO}\n\n{DESCRIPTION}\n\n"
        f"Trained from scratch by `python -m diffseg_core.demo_model.train` (seed {cfg.seed}); "
        "settings, losses and times in training.json. VAE + UNet weights are learned; the CLIP text "
        "encoder keeps its seeded random initialisation (only the empty prompt is ever encoded).\n"
    )
    save_sd1_pipeline(out, unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, readme=readme)
    card = {"name": TINY_DEMO, "demo_model": True, "description": DESCRIPTION, "defaults": dict(cfg.defaults)}
    (out / MODEL_CARD).write_text(json.dumps(card, indent=2) + "\n")
    record.update(
        scaling_factor=scaling,
        vae_loss={"first": vae_losses[0], "last": vae_losses[-1]},
        unet_loss={"first": unet_losses[0], "last_50_mean": float(np.mean(unet_losses[-50:]))},
    )
    clock.lap("write")
    record["stages"] = clock.stages
    record["total"] = {k: round(sum(s[k] for s in clock.stages.values()), 1) for k in ("wall_s", "cpu_s")}
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    log(f"total: {record['total']['wall_s']} s wall, {record['total']['cpu_s']} s CPU -> {out}")
    return record


def _train_vae(vae, scenes: np.ndarray, photos: list[np.ndarray], rng: np.random.Generator, cfg: TrainConfig,
               log: Callable[[str], None]) -> list[float]:
    opt = torch.optim.AdamW(vae.parameters(), cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.vae_lr, total_steps=max(cfg.vae_steps, 1), pct_start=0.05)
    c, n, size = cfg.vae_crop, len(scenes), scenes.shape[1]
    losses = []
    for step in range(cfg.vae_steps):
        batch = []
        for _ in range(cfg.vae_batch):
            if rng.random() < cfg.photo_share:
                batch.append(_photo_crop(rng, photos, c))
            else:
                y, x = (int(v) for v in rng.integers(0, size - c + 1, size=2))
                batch.append(scenes[int(rng.integers(n)), y : y + c, x : x + c])
        x = _to_tensor(np.stack(batch))
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.mean).sample
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = (recon - x).abs().mean() + cfg.vae_kl_weight * kl
        losses.append(_step(loss, opt, sched))
        if step % 100 == 0 or step == cfg.vae_steps - 1:
            log(f"vae step {step}: loss {losses[-1]:.4f}")
    return losses or [float("nan")]


def _train_unet(unet, latents: torch.Tensor, condition: torch.Tensor, ddpm, rng: np.random.Generator,
                cfg: TrainConfig, log: Callable[[str], None]) -> list[float]:
    import torch.nn.functional as F

    qk = []
    for name, module in unet.named_modules():
        if name.endswith("attn1"):  # self-attention: start from symmetric, sharper logits (q = k)
            with torch.no_grad():
                module.to_q.weight.mul_(cfg.qk_init_gain)
                module.to_k.weight.copy_(module.to_q.weight)
            qk += [module.to_q.weight, module.to_k.weight]
    qk_ids = {id(p) for p in qk}
    lrs = [cfg.unet_lr, cfg.unet_lr * cfg.qk_lr_scale]
    opt = torch.optim.AdamW([{"params": [p for p in unet.parameters() if id(p) not in qk_ids], "lr": lrs[0]},
                             {"params": qk, "lr": lrs[1]}], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lrs, total_steps=max(cfg.unet_steps, 1), pct_start=0.05)
    side, c, b = latents.shape[-1], cfg.unet_crop, cfg.unet_batch
    condition = condition.expand(b, -1, -1)
    losses = []
    for step in range(cfg.unet_steps):
        z = latents[torch.from_numpy(rng.integers(0, len(latents), b))]
        y, x = (int(v) for v in rng.integers(0, side - c + 1, size=2))
        z = torch.rot90(z[:, :, y : y + c, x : x + c], int(rng.integers(4)), (2, 3))
        if rng.random() < 0.5:
            z = z.flip(3)
        noise = torch.randn_like(z)
        t = torch.from_numpy(rng.integers(cfg.t_min, cfg.t_max, b))
        pred = unet(ddpm.add_noise(z, noise, t), t, encoder_hidden_states=condition).sample
        loss = F.mse_loss(pred, noise)
        losses.append(_step(loss, opt, sched))
        if step % 50 == 0 or step == cfg.unet_steps - 1:
            log(f"unet step {step}: loss {losses[-1]:.4f}")
    return losses or [float("nan")]


def main(argv: list[str] | None = None) -> int:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(tiny_demo_path()), help="output folder (default: the shipped model)")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "defaults":
            continue
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            parser.add_argument(f"--{f.name.replace('_', '-')}", action=argparse.BooleanOptionalAction, default=default)
        else:
            parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(default), default=default)
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    train(out, TrainConfig(**args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Run a tiny model's UNet once through diffusers' own pipeline classes, with a forward
pre-hook on chosen attention layers: the independent reference the extractor's capture and
the vocabulary probe are checked against."""
from __future__ import annotations

import math
from typing import Callable

import torch

PreHook = Callable[[str, torch.nn.Module, tuple, dict], None]


def run_unet_with_hooks(path, variant: str, pixels: torch.Tensor, layer_suffix: str, hook: PreHook,
                        timestep: int = 300) -> None:
    """Load ``path`` with StableDiffusion(XL)Pipeline, encode ``pixels`` with its VAE (posterior
    mean), and make one UNet call on the empty prompt at ``timestep``, calling
    ``hook(name, module, args, kwargs)`` before every module whose name ends with ``layer_suffix``."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionPipeline if variant == "sd1" else StableDiffusionXLPipeline
    pipe = cls.from_pretrained(path)
    unet = pipe.unet
    handles = [
        m.register_forward_pre_hook(lambda module, args, kwargs, name=name: hook(name, module, args, kwargs),
                                    with_kwargs=True)
        for name, m in unet.named_modules()
        if name.endswith(layer_suffix)
    ]
    try:
        with torch.no_grad():
            latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
            b, size = pixels.shape[0], pixels.shape[-1]
            kwargs = {}
            if variant == "sd1":
                emb, _ = pipe.encode_prompt("", "cpu", 1, False)
            else:
                emb, _, pooled, _ = pipe.encode_prompt("", device="cpu", num_images_per_prompt=1,
                                                       do_classifier_free_guidance=False)
                time_ids = pipe._get_add_time_ids(
                    (size, size), (0, 0), (size, size), dtype=emb.dtype,
                    text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
                )
                kwargs["added_cond_kwargs"] = {"text_embeds": pooled.expand(b, -1),
                                               "time_ids": time_ids.expand(b, -1)}
            unet(latents, timestep, encoder_hidden_states=emb.expand(b, -1, -1), **kwargs)
    finally:
        for h in handles:
            h.remove()


def head_mean_softmax(module: torch.nn.Module, hidden: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) averaged over heads, with the layer's own ``to_q`` on ``hidden``
    (B, N, C) and ``to_k`` on ``context`` (B or 1, M, C'): (B, N, M)."""
    q, k = module.to_q(hidden), module.to_k(context)
    d = q.shape[-1] // module.heads
    q = q.view(q.shape[0], q.shape[1], module.heads, d).transpose(1, 2)
    k = k.view(k.shape[0], k.shape[1], module.heads, d).transpose(1, 2)
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1).mean(dim=1)

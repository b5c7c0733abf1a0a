"""tiny-demo: a small Stable-Diffusion-shaped model with learned weights, shipped in ``tiny-demo/``.

``scenes`` makes the synthetic scenes it is trained and scored on; ``train``
trains it from scratch (``python -m diffseg_core.demo_model.train``). The model
name ``"tiny-demo"`` resolves to the shipped folder (``diffseg_core.tiny_model``).
It is a demo trained for minutes, not Stable Diffusion.
"""

"""The model actor's batch loop (no Ray): precision, what it ships, and the device-batched code path.

tiny-random has RANDOM weights: its attention is nearly uniform, so these tests use
kl_threshold=1e-3 to get ~45 segments per image, labels with structure to compare
(they mean nothing). The GPU-only branches of the merge are the device-batched ones
(``merge.runs_batched``); they are run here on CPU tensors by forcing that switch.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from pipeline_helpers import actor_batch

import diffseg_core.merge as merge
from diffseg_core.extract import (
    AttentionExtractor,
    preprocess_images,
    resolve_vae_dtype,
)
from diffseg_core.segmentor import DiffSeg
from pipeline.data.encode import compact, decode_png
from pipeline.job.actors import LabelActor
from pipeline.job.labels import labels_to_host, pack_label_map, unpack_label_map
from pipeline.job.tasks import encode_rows
from tests.official_fixtures import CASES, build_maps, load_case
from tests.synthetic_attention import agreement

SIZE = 64
DIFFSEG = {"kl_threshold": 1e-3, "num_points": 8}
# (height, width) of each photo as the decode stage reports it: the label is made at that size.
SIZES = [(64, 64), (200, 300), (37, 91)]


def _batch(sizes=SIZES) -> dict[str, np.ndarray]:
    return actor_batch(sizes, SIZE)


@pytest.fixture(scope="module")
def actor() -> LabelActor:
    return LabelActor("tiny-random", device="cpu", dtype=None, image_size=SIZE, timestep=300, revision=None,
                      diffseg_kwargs=DIFFSEG, threads=1)


@torch.inference_mode()
def _reference_labels(actor: LabelActor, batch: dict) -> list[np.ndarray]:
    """The path before this change: host preprocessing, float NMS to raw labels, compaction in encode."""
    ex = actor.extractor
    pixels = preprocess_images(list(batch["pixels"]), SIZE)
    proposals = actor.diffseg.proposals(ex.attention(ex.encode(pixels)))
    return [compact(merge.labels_from_proposals(p, (int(h), int(w))).numpy())[0]
            for p, h, w in zip(proposals, batch["height"], batch["width"])]


def test_uint8_batches_become_the_pixels_preprocessing_gives(actor):
    pixels = _batch()["pixels"]
    pixels.flags.writeable = False  # as Ray hands batches over
    direct = actor.extractor.to_pixels(pixels)
    torch.testing.assert_close(direct, preprocess_images(list(pixels), SIZE), rtol=0, atol=1e-6)


def test_actor_labels_are_the_earlier_path_exactly_and_rows_are_small(actor):
    batch = _batch()
    out = actor(batch)
    assert list(out["error"]) == [None] * 3 and "pixels" not in out
    reference = _reference_labels(actor, batch)
    for packed, ref, (h, w) in zip(out["label_packed"], reference, SIZES):
        labels = unpack_label_map(packed, h, w)
        assert labels.dtype == np.uint8 and labels.max() > 5  # structured labels, compacted on the device
        np.testing.assert_array_equal(labels, ref)  # integers from an unchanged float path: exact
    table = encode_rows(out, rle=False)
    for png, ref in zip(table.column("label_map").to_pylist(), reference):
        np.testing.assert_array_equal(decode_png(png), ref)


def test_a_row_of_a_large_image_is_tens_of_kb_not_its_raw_map(actor):
    cases = [((2000, 3000), 200), ((512, 512), 20)]  # (size, at least this many times smaller than raw)
    out = actor(_batch([size for size, _ in cases]))
    for i, ((h, w), factor) in enumerate(cases):
        row_bytes = sum(len(v[i]) if isinstance(v[i], (bytes, str)) else np.asarray(v[i]).nbytes
                        for k, v in out.items())
        raw = h * w * 2  # what the actor shipped before: uint16 at the image's own size (12 MB, 0.5 MB)
        assert row_bytes < 64 * 1024 and row_bytes * factor < raw, (h, w, row_bytes)
        assert unpack_label_map(out["label_packed"][i], h, w).shape == (h, w)


def test_two_calls_at_once_give_what_one_at_a_time_gives(actor):
    batch = _batch()
    sizes = list(zip(batch["height"].tolist(), batch["width"].tolist()))
    alone = actor.label_maps(batch["pixels"], sizes)
    results: list = [None, None]

    def work(slot):
        results[slot] = actor.label_maps(batch["pixels"], sizes)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got in results:
        for a, b in zip(got, alone):
            np.testing.assert_array_equal(a, b)


def test_a_corrupt_packed_map_is_an_error_row_not_a_crash(actor):
    out = actor(_batch())
    out["label_packed"] = out["label_packed"].copy()
    out["label_packed"][1] = out["label_packed"][1][:5]
    table = encode_rows(out, rle=False)
    errors = table.column("error").to_pylist()
    assert errors[0] is None and errors[2] is None and errors[1].startswith("encode error:")


def test_packing_round_trips_uint8_and_uint16_and_refuses_other_input():
    rng = np.random.default_rng(0)
    for dtype, high in ((np.uint8, 200), (np.uint16, 60000)):
        labels = rng.integers(0, high, size=(13, 7)).astype(dtype)
        back = unpack_label_map(pack_label_map(labels), 13, 7)
        assert back.dtype == dtype and (back == labels).all()
    with pytest.raises(ValueError, match="uint8 or uint16"):
        pack_label_map(np.zeros((3, 3), np.int64))
    with pytest.raises(ValueError, match="not a packed label map"):
        unpack_label_map(b"\x07abc", 1, 1)


def test_labels_come_back_as_uint16_past_256_proposals():
    maps = [torch.arange(300 * 2).reshape(20, 30) % 300, torch.zeros(2, 2, dtype=torch.long)]
    host = labels_to_host(maps, [300, 1])
    assert [h.dtype for h in host] == [np.uint16, np.uint16]
    assert (host[0] == maps[0].numpy()).all() and host[1].shape == (2, 2)


def test_core_labels_through_labels_to_host_in_bands(monkeypatch):
    torch.manual_seed(0)
    proposals = torch.rand(6, 8, 8)
    seg = DiffSeg(num_points=2)
    for size in [(1, 1), (7, 3), (301, 157)]:
        expected = compact(merge.labels_from_proposals(proposals, size).numpy())[0]
        (got,) = labels_to_host(seg.label_maps([proposals], [size]), [6])
        assert got.dtype == np.uint8 and (got == expected).all()
    monkeypatch.setattr(merge, "NMS_BAND_ELEMENTS", 6 * 157 * 5)  # a huge image is done in bands of rows
    (banded,) = labels_to_host(seg.label_maps([proposals], [(301, 157)]), [6])
    assert (banded == expected).all()


# --- the device-batched (GPU) code path, run on CPU tensors ---------------------------------


@pytest.mark.parametrize("name", CASES[::3])
def test_device_batched_merge_agrees_with_the_cpu_path_on_the_official_fixtures(name, monkeypatch):
    maps = build_maps(load_case(name))
    maps = {r: torch.cat([m, m.flip(-1).flip(-2)]) for r, m in maps.items()}  # a batch of 2 different images
    seg = DiffSeg(kl_threshold=1.1, num_points=16)
    per_image = seg.segment(maps, (128, 128))
    monkeypatch.setattr(merge, "runs_batched", lambda device: True)
    batched = seg.segment(maps, (128, 128))
    for a, b in zip(per_image, batched):
        assert int(a.max()) == int(b.max())
        assert agreement(a.numpy(), b.numpy()) >= 0.999


def test_device_batched_greedy_merge_is_the_per_image_one():
    torch.manual_seed(3)
    base = torch.softmax(torch.randn(4, 64) * 3, -1)
    proposals = [torch.softmax(torch.log(base[torch.randint(0, 4, (n,))]) + 0.05 * torch.randn(n, 64), -1)
                 for n in (9, 5)]
    padded = torch.zeros(2, 9, 64)
    padded[0], padded[1, :5] = proposals[0], proposals[1]
    merged, counts = merge.merge_proposals_batch(padded, np.array([9, 5]), tau=0.5)
    for b, p in enumerate(proposals):
        expected = merge.merge_proposals(p, 0.5)
        assert counts[b] == len(expected) < len(p)
        torch.testing.assert_close(merged[b, : counts[b]], expected, rtol=1e-5, atol=1e-6)


def test_device_batched_actor_path_keeps_nearly_every_pixel(actor, monkeypatch):
    batch = _batch()
    sizes = list(zip(batch["height"].tolist(), batch["width"].tolist()))
    cpu = actor.label_maps(batch["pixels"], sizes)
    monkeypatch.setattr(merge, "runs_batched", lambda device: True)
    batched = actor.label_maps(batch["pixels"], sizes)
    for a, b in zip(cpu, batched):
        assert agreement(a.astype(np.int64), b.astype(np.int64)) >= 0.99


def test_sdpa_output_leaves_the_maps_as_they_were(actor):
    ex = actor.extractor
    pixels = ex.to_pixels(_batch()["pixels"])
    ex.early_stop = False  # every layer's output feeds a later layer
    try:
        eager = ex(pixels)
        ex._state.sdpa_output = True
        fused = ex(pixels)
    finally:
        ex._state.sdpa_output = False
        ex.early_stop = True
    for r in eager:
        torch.testing.assert_close(fused[r], eager[r], rtol=0, atol=1e-6)


# --- VAE precision ---------------------------------------------------------------------------


def test_bf16_encode_agrees_with_float32(actor, tiny_model_path):
    import logging

    said: list[logging.LogRecord] = []
    heard = logging.Handler()
    heard.emit = said.append  # type: ignore[method-assign]
    diffusers_log = logging.getLogger("diffusers")  # its own handler, not propagated: listen on it directly
    diffusers_log.addHandler(heard)
    try:
        bf16 = AttentionExtractor.from_pretrained(tiny_model_path, image_size=SIZE, vae_dtype="bf16")
    finally:
        diffusers_log.removeHandler(heard)
    # the cast is quiet: diffusers' "modules ... kept in float32: []" would print once per GPU actor
    assert not [r for r in said if "kept in float32" in r.getMessage()]
    fp32 = AttentionExtractor.from_pretrained(tiny_model_path, image_size=SIZE, vae_dtype="fp32")
    assert bf16.vae_dtype == torch.bfloat16 and fp32.vae_dtype == torch.float32 == bf16.dtype
    pixels = fp32.to_pixels(_batch()["pixels"])
    a, b = fp32.encode(pixels), bf16.encode(pixels)
    assert b.dtype == torch.float32  # handed to the UNet in its dtype
    relative = float((a - b).norm() / a.norm())
    assert relative < 0.03, relative  # bf16 keeps 8 bits of mantissa: about 1% after the encoder


def test_vae_dtype_choice():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
    assert resolve_vae_dtype(None, f32, cpu, force_upcast=True) == f32
    assert resolve_vae_dtype("auto", f16, cpu, force_upcast=True) == f32  # fp16 would overflow
    assert resolve_vae_dtype(None, f16, cpu, force_upcast=False) == f16
    assert resolve_vae_dtype("bf16", f32, cpu, force_upcast=True) == bf16  # asked for: given
    assert resolve_vae_dtype(None, f32, cuda, force_upcast=True) == f32  # fp32 UNet: exactness asked for
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_vae_dtype("fp8", f32, cpu, force_upcast=True)


def test_gpu_vae_default_is_bf16_where_the_gpu_has_it(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve_vae_dtype(None, torch.float16, cuda, force_upcast=True) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)  # pre-Ampere
    assert resolve_vae_dtype(None, torch.float16, cuda, force_upcast=True) == torch.float32
    assert resolve_vae_dtype(None, torch.float16, cuda, force_upcast=False) == torch.float16


def test_vae_dtype_is_a_label_parameter_only_when_chosen():
    from pipeline.data.manifest import IncompatibleOutputError, check_compatible
    from pipeline.errors import LabelError
    from pipeline.job.options import LabelOptions, validate_options

    auto = LabelOptions().label_parameters(512, "fp16")
    assert "vae_dtype" not in auto  # outputs made before the option resume
    assert LabelOptions(vae_dtype="auto").label_parameters(512, "fp16") == auto
    fp32 = LabelOptions(vae_dtype="fp32").label_parameters(512, "fp16")
    assert fp32["vae_dtype"] == "fp32"
    with pytest.raises(IncompatibleOutputError, match=r"vae_dtype off -> 'fp32'"):
        check_compatible({"input": "i", "model": None, "parameters": auto}, "i", None, fp32, "out")
    with pytest.raises(LabelError, match="--vae-dtype must be"):
        validate_options(LabelOptions(vae_dtype="fp8"))


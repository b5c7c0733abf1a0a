"""Labeler: images -> DiffSeg label maps at each image's own size (tiny RANDOM-weight model)."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from diffseg_core import DiffSeg
from diffseg_core.labeler import Labeler
from diffseg_core.merge import compact_labels, labels_from_proposals
from tests.tolerances import assert_same_labels


@pytest.fixture(scope="module")
def labeler(tiny_model_path):
    return DiffSeg.from_pretrained(tiny_model_path, kl_threshold=1.1, num_points=16)


def _image(h, w, seed=0):
    """A blocky image (two halves of different colours plus noise) so segments are not trivial."""
    rng = np.random.RandomState(seed)
    img = rng.randint(0, 40, (h, w, 3), dtype=np.uint8)
    img[:, w // 2 :] += np.array([200, 100, 10], dtype=np.uint8)
    return img


def test_labels_at_each_images_own_size(labeler):
    images = [_image(97, 211), _image(300, 40, 1), _image(1, 1, 2), _image(128, 128, 3)]
    labels = labeler(images)
    assert len(labels) == len(images)
    for img, lab in zip(images, labels):
        assert isinstance(lab, np.ndarray) and lab.dtype == np.int64
        assert lab.shape == img.shape[:2]
        values = np.unique(lab)
        assert values.tolist() == list(range(len(values)))  # 0..K-1, no gaps


def test_upsamples_proposals_to_the_original_size(labeler):
    """Labels come from the proposals upsampled to (H, W), not a resize of a square label map."""
    images = [_image(75, 190, 4), _image(128, 128, 5)]
    labels = labeler(images)
    maps = labeler.extractor(images)
    proposals = labeler.diffseg.proposals(maps)
    for p, img, lab in zip(proposals, images, labels):
        expected = compact_labels(labels_from_proposals(p, img.shape[:2])).numpy()
        np.testing.assert_array_equal(lab, expected)
    # for an image already at the model's size this is DiffSeg.segment (on a batch of one:
    # other matrix shapes, so equal up to float ties)
    seg = labeler.diffseg.segment({r: m[1:] for r, m in maps.items()}, output_size=(128, 128))
    assert_same_labels(labels[1], seg[0].numpy())


def test_batch_array_input_and_determinism(labeler):
    batch = np.stack([_image(64, 48, s) for s in range(3)])
    a = labeler(batch)
    b = labeler(list(batch))
    assert [x.shape for x in a] == [(64, 48)] * 3
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert labeler([]) == []


def test_diffseg_kwargs_reach_diffseg(tiny_model_path):
    lab = DiffSeg.from_pretrained(tiny_model_path, kl_threshold=[0.9, 1.0], num_points=8, refine=True)
    assert lab.diffseg.thresholds == [0.9, 1.0] and lab.diffseg.num_points == 8 and lab.diffseg.refine
    info = lab.model_info
    assert info["diffseg"]["kl_threshold"] == [0.9, 1.0] and info["diffseg"]["refine"] is True
    assert info["image_size"] == 128 and info["timestep"] == 300
    out = lab([_image(50, 70)])
    assert out[0].shape == (50, 70)


def test_bad_diffseg_kwargs_fail_before_loading():
    with pytest.raises(ValueError, match="kl_threshold"):
        DiffSeg.from_pretrained("/nonexistent/model", kl_threshold=-1.0)


def test_diffseg_from_pretrained_alias(tmp_path, monkeypatch, tiny_model_path):
    from diffseg_core.tiny_model import tiny_random_path

    monkeypatch.setenv("DIFFSEG_CACHE", str(tmp_path))
    shutil.copytree(tiny_model_path, tiny_random_path())  # what resolve_model would build, pre-built
    lab = DiffSeg.from_pretrained("tiny-random")
    assert isinstance(lab, Labeler)
    assert lab.model_info["random_weights"] is True
    labels = lab([_image(33, 65)])
    assert labels[0].shape == (33, 65)
    assert isinstance(lab.extractor(np.stack([_image(8, 8)]))[16], torch.Tensor)


def test_attention_resolutions_are_known_before_running(tiny_model_path, tiny_sdxl_model_path):
    from diffseg_core.extract import AttentionExtractor

    for path in (tiny_model_path, tiny_sdxl_model_path):
        for size in (None, 64):
            extractor = AttentionExtractor.from_pretrained(path, image_size=size)
            maps = extractor(np.zeros((1, 20, 30, 3), dtype=np.uint8))
            assert extractor.attention_resolutions == sorted(maps, reverse=True)
            assert extractor.model_info["attention_resolutions"] == extractor.attention_resolutions


def test_anchor_grid_larger_than_the_attention_is_a_clear_error(tiny_model_path):
    with pytest.raises(ValueError, match=r"num_points=16 needs .* at least 16 x 16.* gives 8 x 8"):
        DiffSeg.from_pretrained(tiny_model_path, image_size=64)
    assert DiffSeg.from_pretrained(tiny_model_path, image_size=64, num_points=8).diffseg.num_points == 8


def test_label_with_a_vocabulary_names_every_segment_or_says_unknown(labeler, tiny_model_path):
    named = DiffSeg.from_pretrained(tiny_model_path, kl_threshold=1.1, num_points=16,
                                    vocabulary="person,dog,grass,sky", class_threshold=0.3)
    assert named.class_names == ("person", "dog", "grass", "sky")
    images = [_image(97, 211), _image(128, 128, 3)]
    results = named.label(images)
    for img, result, plain in zip(images, results, labeler(images)):
        np.testing.assert_array_equal(result.label_map, plain)  # segments do not change
        k = int(result.label_map.max()) + 1
        assert result.classes.shape == result.scores.shape == (k,)
        assert set(result.classes.tolist()) <= {-1, 0, 1, 2, 3}
        assert ((result.scores >= 0) & (result.scores <= 1)).all()
        assert (result.classes[result.scores < 0.3] == -1).all()
        assert result.class_map.shape == img.shape[:2] and result.class_map.dtype == np.uint8
        lut = np.where(result.classes >= 0, result.classes, 255)
        np.testing.assert_array_equal(result.class_map, lut[result.label_map])
    assert named.model_info["class_voting"] == {"voting": "majority", "threshold": 0.3}
    # without a vocabulary, label() gives label maps only
    assert labeler.label(images[:1])[0].classes is None


def test_bad_class_voting_fails_before_loading(tmp_path):
    with pytest.raises(ValueError, match="class voting"):
        DiffSeg.from_pretrained(tmp_path / "missing", vocabulary="dog,cat", class_voting="median")


def test_imports_point_one_way_between_the_segmentor_and_the_labeler():
    """segmentor -> labeler only (DiffSeg.from_pretrained hands the method to the labeler);
    importing the labeler must not import the segmentor, or the two form a circle again."""
    import subprocess
    import sys

    code = ("import sys, diffseg_core.labeler; "
            "print('diffseg_core.segmentor' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_diffseg_has_every_member_the_labeler_types_its_method_with():
    """The labeler types its method with a protocol instead of importing the segmentor; DiffSeg
    (with each option on) must keep every member of it."""
    from diffseg_core.segmentation_method import SegmentationMethod

    members = sorted(n for n in vars(SegmentationMethod) if not n.startswith("_"))
    assert {"proposals", "label_maps", "num_points", "weights", "cleans"} <= set(members)
    for method in (DiffSeg(), DiffSeg(boundaries="pamr", min_region_area=4, connected=True, refine=True)):
        assert [n for n in members if not hasattr(method, n)] == []

"""The semantic segmenter plugin: class maps that line up with the frame, area fractions, RLE masks, events."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from known_models import BrightClassSegmenter
from pydantic import ValidationError
from torch import nn

from vigild.config.loading import CameraConfig
from vigild.frame import Frame
from vigild.plugin import FrameErrors, PluginContext
from vigild.plugins.segmentation.models import SemanticBackend
from vigild.plugins.segmentation.semantic_segmenter import SemanticSegmenter, SemanticSegmenterConfig
from vigild.vision.masks import rle_decode

SCENES = [  # width, height, rectangle x1, y1, x2, y2
    (1920, 1080, 600, 300, 1500, 900),
    (768, 576, 0, 100, 200, 576),
    (480, 800, 50, 60, 430, 200),
]


def frame_with_rectangle(camera: str, width: int, height: int, x1: int, y1: int, x2: int, y2: int) -> Frame:
    image = np.full((height, width, 3), 30, np.uint8)
    image[y1:y2, x1:x2] = 255
    return Frame(camera, 3, time.time(), time.monotonic(), image)


def plugin(**overrides) -> SemanticSegmenter:
    config = SemanticSegmenterConfig(**({"weights": None, "input_size": 128} | overrides))
    segmenter = SemanticSegmenter(config, PluginContext("cpu", {"c": CameraConfig(source="c.mp4")}))
    return segmenter


def known_plugin(**overrides) -> SemanticSegmenter:
    """The plugin with the known-weights model in place of the torchvision network."""
    segmenter = plugin(**({"input_size": (640, 384), "class_names": ["ground", "box"]} | overrides))
    segmenter.backend = SemanticBackend(BrightClassSegmenter(), ("ground", "box"), (640, 384), "cpu", False)
    return segmenter


def test_fractions_and_rle_masks_line_up_with_a_known_rectangle_in_frames_of_mixed_sizes():
    segmenter = known_plugin(mask="rle")
    frames = [frame_with_rectangle(f"cam{i}", *scene) for i, scene in enumerate(SCENES)]
    segmenter.process(frames)
    for frame, (width, height, x1, y1, x2, y2) in zip(frames, SCENES, strict=True):
        truth = np.zeros((height, width), bool)
        truth[y1:y2, x1:x2] = True
        (event,) = frame.events
        assert event.type == "segmentation" and event.camera == frame.camera and event.frame == 3
        assert event.data["fractions"]["box"] == pytest.approx(truth.mean(), abs=0.01)
        assert sum(event.data["fractions"].values()) == pytest.approx(1.0, abs=1e-3)
        mask = rle_decode(event.data["mask"]["classes"]["box"])
        assert mask.shape == (height, width)
        iou = (mask & truth).sum() / (mask | truth).sum()
        assert iou > 0.97, f"{width}x{height}: IoU {iou:.3f}"
        assert frame.segmentation is not None
        map_h, map_w = frame.segmentation.class_map.shape  # the model's resolution, the frame's aspect ratio
        assert map_w / map_h == pytest.approx(width / height, rel=0.02)


def test_without_mask_the_event_carries_only_the_classes_present():
    segmenter = known_plugin()
    frame = Frame("c", 0, time.time(), time.monotonic(), np.full((360, 640, 3), 30, np.uint8))
    segmenter.process([frame])
    assert frame.events[0].data == {"model": "lraspp_mobilenet_v3_large", "fractions": {"ground": 1.0}}


def test_a_corrupt_frame_fails_alone():
    segmenter = known_plugin()
    good = frame_with_rectangle("good", *SCENES[0])
    bad = Frame("bad", 0, time.time(), time.monotonic(), np.zeros((10, 10, 4), np.uint8))
    with pytest.raises(FrameErrors) as failed:
        segmenter.process([good, bad])
    assert list(failed.value.errors) == [1]
    assert good.events and not bad.events


class NormalisedBrightSegmenter(nn.Module):
    """`BrightClassSegmenter` through a convolution and a BatchNorm with known weights: the channels' mean (1x1
    convolution), then (mean - 1) / 0.1 by BatchNorm's running statistics; white gives +12, dark grey -26."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 1, bias=False)
        self.norm = nn.BatchNorm2d(1)
        with torch.no_grad():
            self.conv.weight.fill_(1 / 3)
            self.norm.running_mean.fill_(1.0)
            self.norm.running_var.fill_(0.01)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        bright = self.norm(self.conv(x))
        return {"out": torch.cat([-bright, bright], 1)}


def test_half_runs_the_convolutions_in_reduced_precision_and_keeps_batchnorm_in_float32():
    """`.half()` cast BatchNorm's statistics to float16 too; autocast keeps the weights in float32 and casts only the
    convolutions' operands. On the CPU `half` is bfloat16 autocast (CUDA's float16 autocast has not been run)."""
    half = SemanticBackend(NormalisedBrightSegmenter(), ("ground", "box"), (640, 384), "cpu", True)
    full = SemanticBackend(NormalisedBrightSegmenter(), ("ground", "box"), (640, 384), "cpu", False)
    convolved: list[torch.dtype] = []
    half.model.conv.register_forward_hook(lambda module, inputs, output: convolved.append(output.dtype))
    frames = [frame_with_rectangle("c", *scene).image for scene in SCENES]
    results = half.segment(frames)
    assert convolved == [torch.bfloat16], "the convolution ran in reduced precision"
    norm = half.model.norm
    assert {t.dtype for t in (norm.weight, norm.bias, norm.running_mean, norm.running_var)} == {torch.float32}
    for result, exact, (width, height, x1, y1, x2, y2) in zip(results, full.segment(frames), SCENES, strict=True):
        truth = (x2 - x1) * (y2 - y1) / (width * height)
        assert result.fractions[1] == pytest.approx(truth, abs=0.01)
        np.testing.assert_allclose(result.fractions, exact.fractions, atol=1e-3)


@pytest.mark.parametrize("model", ["deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large", "fcn_resnet50"])
def test_torchvision_architectures_under_half_keep_their_norms_in_float32_and_agree_with_float32(model):
    """Random weights (seeded): the reduced-precision class maps agree with float32's almost everywhere."""
    torch.manual_seed(0)
    full, half = plugin(model=model), plugin(model=model, half=True)
    full.start()
    half.start()
    half.backend.model.load_state_dict(full.backend.model.state_dict())
    norms = [m for m in half.backend.model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(p.dtype == torch.float32 for m in norms for p in (*m.parameters(), m.running_var))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for w, h, *_ in SCENES]
    for exact, reduced in zip(full.backend.segment(images), half.backend.segment(images), strict=True):
        assert (exact.class_map == reduced.class_map).mean() > 0.99
        np.testing.assert_allclose(reduced.fractions, exact.fractions, atol=0.01)


@pytest.mark.parametrize("model", ["deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large", "fcn_resnet50"])
def test_torchvision_architectures_segment_a_mixed_batch_as_they_do_single_frames(model):
    """Random weights (torchvision's cannot be downloaded here): shapes, fractions and batch = single frame."""
    segmenter = plugin(model=model)
    segmenter.start()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for w, h, *_ in SCENES]
    batched = segmenter.backend.segment(images)
    for image, result in zip(images, batched, strict=True):
        (single,) = segmenter.backend.segment([image])
        assert len(result.fractions) == 21 and result.fractions.sum() == pytest.approx(1.0, abs=1e-4)
        np.testing.assert_allclose(result.fractions, single.fractions, atol=0.01)
        map_h, map_w = result.class_map.shape
        assert map_w / map_h == pytest.approx(image.shape[1] / image.shape[0], rel=0.05)


def test_a_missing_weights_file_is_a_config_error_naming_it(tmp_path):
    with pytest.raises(ValidationError, match="weights file not found"):
        SemanticSegmenterConfig(weights=str(tmp_path / "nope.pth"))

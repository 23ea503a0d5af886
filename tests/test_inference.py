"""The batched device pipeline of the ultralytics back end, on the CPU.

Frames of different sizes are letterboxed into one batch; what each frame gets back must not depend on what it
was batched with, and boxes, masks and keypoints must land on the frame's own pixels. `RectangleYolo` (known
weights, tests/known_models.py) says exactly where; the real YOLO architectures check batch = single frame.
None of this has run on CUDA: what differs there (the staging upload, float16, NMS offsets at large batches) is
checked here where its logic can run on the CPU.
"""

from __future__ import annotations

import copy
import logging
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from known_models import RectangleYolo
from torchvision.ops import box_iou

from vigild.config.loading import CameraConfig, PluginSpec
from vigild.frame import Frame
from vigild.pipeline.chain import Chain
from vigild.plugins.detection.detector import Detector, DetectorConfig
from vigild.plugins.detection.yolo import YoloBackend, decode_in_float32, select
from vigild.vision.device import OomSplitter
from vigild.vision.letterbox import Letterboxer
from vigild.vision.masks import InstanceMask, rle_decode

# (width, height, rectangle x1, y1, x2, y2): landscape, 4:3, portrait and tiny frames, rectangles near edges too
SCENES = [
    (1920, 1080, 600, 300, 1500, 900),
    (768, 576, 0, 100, 200, 576),
    (480, 800, 50, 60, 430, 200),
    (1280, 720, 1000, 10, 1280, 300),
    (64, 48, 10, 10, 40, 30),
]
INPUT = (640, 384)


def scene(width: int, height: int, x1: int, y1: int, x2: int, y2: int) -> np.ndarray:
    image = np.full((height, width, 3), 30, np.uint8)
    image[y1:y2, x1:x2] = 255
    return image


def rectangle_backend(task: str, mask_format: str = "polygon", half: bool = False) -> YoloBackend:
    kpt_shape = (4, 3) if task == "pose" else None
    return YoloBackend(
        RectangleYolo(task), task, ("box", "other"), INPUT, 0.5, 0.45, "cpu", half, mask_format, kpt_shape  # type: ignore[arg-type]
    )


def tolerance(width: int, height: int) -> float:
    """One model pixel in frame pixels (the resize blurs an edge by up to that), plus one."""
    return max(width / INPUT[0], height / INPUT[1]) + 1.0


@pytest.mark.parametrize("half", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("task", ["detect", "segment", "pose"])
def test_each_frame_of_a_mixed_batch_gets_its_own_rectangle_back_as_when_alone(task, half):
    """`half` on the CPU is bfloat16: the letterbox and the network run in it (CUDA would use float16)."""
    backend = rectangle_backend(task, half=half)
    assert backend.letterbox.dtype == (torch.bfloat16 if half else torch.float32)
    images = [scene(*s) for s in SCENES]
    batched = backend.detect(images)
    alone = [backend.detect([image])[0] for image in images]
    for (width, height, *rect), together, single in zip(SCENES, batched, alone, strict=True):
        assert len(together) == len(single) == 1
        np.testing.assert_allclose(together.xyxy, single.xyxy, atol=1.0)
        assert together.class_id.tolist() == single.class_id.tolist() == [0]
        assert together.label(0) == "box"
        np.testing.assert_allclose(together.xyxy[0], rect, atol=tolerance(width, height))
        if task == "pose":
            assert together.keypoints is not None and together.keypoints.shape == (1, 4, 3)
            x1, y1, x2, y2 = rect
            corners = [[x1, y1], [x2, y1], [x2, y2], [x1, y2]]
            np.testing.assert_allclose(together.keypoints[0, :, :2], corners, atol=tolerance(width, height))


@pytest.mark.parametrize("mask_format", ["polygon", "rle"])
def test_instance_masks_line_up_with_the_rectangle_in_the_frame(mask_format):
    backend = rectangle_backend("segment", mask_format)
    images = [scene(*s) for s in SCENES]
    for (width, height, x1, y1, x2, y2), detections in zip(SCENES, backend.detect(images), strict=True):
        assert detections.masks is not None
        mask = detections.masks[0]
        truth = np.zeros((height, width), bool)
        truth[y1:y2, x1:x2] = True
        full = mask.to_frame()
        assert full.shape == (height, width)
        iou = (full & truth).sum() / (full | truth).sum()
        assert iou > 0.9, f"{width}x{height}: mask IoU with the rectangle {iou:.3f}"
        encoded = mask.to_json()
        assert encoded["format"] == mask_format
        if mask_format == "rle":
            np.testing.assert_array_equal(rle_decode(encoded["rle"]), full)
        else:
            points = np.concatenate([np.reshape(p, (-1, 2)) for p in encoded["polygons"]])
            tol = tolerance(width, height) + 2 * width / INPUT[0]  # + the prototype's 4-pixel cells
            np.testing.assert_allclose(points.min(0), [x1, y1], atol=tol)
            np.testing.assert_allclose(points.max(0), [x2 - 1, y2 - 1], atol=tol)


def _sorted(detections):
    """Objects in a canonical order (ties of these untrained models' scores are common), boxes rounded to 1 px."""
    box = np.round(detections.xyxy)
    keys = [box[:, 3], box[:, 2], box[:, 1], box[:, 0], -np.round(detections.confidence, 4)]
    if detections.keypoints is not None:  # boxes clipped to the frame's edges can coincide
        keys = [np.round(detections.keypoints[:, :, :2].sum((1, 2))), *keys]
    order = np.lexsort(keys)
    return detections[order]


@pytest.mark.parametrize(
    ("weights", "confidence"),
    [("yolov8n.yaml", 3e-5), ("yolov8n-seg.yaml", 3e-5), ("yolov8n-pose.yaml", 3e-4), ("yolo11n.yaml", 3e-5)],
)
def test_real_architectures_give_each_frame_the_same_objects_in_a_batch_as_alone(weights, confidence):
    """Untrained (built from the yaml, no weights can be downloaded here), at a threshold that keeps objects."""
    backend = YoloBackend.load(weights, INPUT, confidence, 0.45, "cpu", False)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for w, h, *_ in SCENES[:4]]
    batched = backend.detect(images)
    found = 0
    for image, together in zip(images, batched, strict=True):
        single = backend.detect([image])[0]
        assert len(together) == len(single)
        found += len(single)
        a, b = _sorted(together), _sorted(single)
        np.testing.assert_allclose(a.xyxy, b.xyxy, atol=1.0)
        assert a.class_id.tolist() == b.class_id.tolist()
        if backend.task == "pose":
            assert a.keypoints is not None and b.keypoints is not None
            np.testing.assert_allclose(a.keypoints[..., :2], b.keypoints[..., :2], atol=1.0)
        if backend.task == "segment":
            assert a.masks is not None and len(a.masks) == len(a)
    assert found > 0, "the threshold kept no objects: the comparison would be empty"


def test_in_bfloat16_the_yolo_head_still_decodes_boxes_in_float32():
    """bfloat16 has 8 bits of mantissa: without float32 decoding a box corner near x=600 could move by 4 pixels,
    and at 1280 pixels (160 anchor cells) the anchors' half-cell centres themselves would round."""
    size = (1280, 768)
    full = YoloBackend.load("yolov8n.yaml", size, 0.25, 0.45, "cpu", False)
    half = YoloBackend.load("yolov8n.yaml", size, 0.25, 0.45, "cpu", True)
    batch, _ = full.letterbox([np.random.default_rng(4).integers(0, 256, (720, 1280, 3), dtype=np.uint8)])
    with torch.inference_mode():
        want = full.model(batch)
        got = half.model(batch.to(torch.bfloat16))
    assert got.dtype == torch.float32
    assert half.model.model[-1].anchors.dtype == torch.float32
    np.testing.assert_allclose(got[:, :4].numpy(), want[:, :4].numpy(), atol=1.0)


def yolov8n_with_fractional_boxes(size: tuple[int, int]) -> torch.nn.Module:
    """yolov8n from its yaml with random biases on the box branches' last convolutions. Untrained, its DFL
    distributions are uniform and every box lands on a whole or half pixel, which any precision represents near
    640; with these biases the boxes have fractions, as a trained model's do."""
    model = YoloBackend.load("yolov8n.yaml", size, 0.25, 0.45, "cpu", False).model
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for branch in model.model[-1].cv2:
            branch[-1].bias.copy_(torch.randn(branch[-1].bias.shape, generator=generator) * 2)
    return model


def test_in_float16_the_yolo_head_decodes_boxes_in_float32():
    """float16, CUDA's `half`, run here on the CPU: 11 bits of mantissa put a box corner in a 1280-pixel input on
    half-pixel steps (measured: 0.53 px off at worst without the float32 decoding, 0.03 px with it)."""
    size = (1280, 768)
    full = yolov8n_with_fractional_boxes(size)
    reduced = copy.deepcopy(full).half()
    plain = copy.deepcopy(reduced)
    decode_in_float32(reduced.model[-1])
    batch, _ = Letterboxer(size, "cpu")([np.random.default_rng(4).integers(0, 256, (720, 1280, 3), dtype=np.uint8)])
    with torch.inference_mode():
        want = full(batch)[:, :4]
        got = reduced(batch.half())
        rounded = plain(batch.half())[:, :4].float()
    assert got.dtype == torch.float32
    assert (rounded - want).abs().max() > 0.25, "the check can tell: float16 decoding is off by more"
    np.testing.assert_allclose(got[:, :4].numpy(), want.numpy(), atol=0.1)


def head_output(objects: list[tuple[int, int, tuple[float, float, float, float], float]], batch: int, classes: int):
    """(batch, 4 + classes, anchors) as a YOLO head gives it: one anchor per object (frame, class, xyxy, score)
    with its centre, size and class score; the anchors of other frames are empty (score 0)."""
    preds = torch.zeros(batch, 4 + classes, len(objects))
    for anchor, (frame, cls, (x0, y0, x1, y1), score) in enumerate(objects):
        preds[frame, :4, anchor] = torch.tensor([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0])
        preds[frame, 4 + cls, anchor] = score
    return preds


def kept(raw) -> set[tuple[int, int, tuple[float, ...]]]:
    return {
        (int(b), int(c), tuple(np.round(box.astype(np.float64), 2).tolist()))
        for b, c, box in zip(raw.batch_index, raw.class_id, raw.xyxy.numpy(), strict=True)
    }


def test_nms_of_frame_63_class_79_keeps_two_small_boxes_that_overlap_less_than_the_threshold():
    """A batch of 64 frames of 80 classes: torchvision's batched_nms shifted frame 63's class 79 by 5119 * 641 ≈ 3.3e6
    in float32, which keeps quarter pixels, so 100.35 became 100.25 and two 1-pixel boxes with IoU 0.48 were
    compared at IoU 0.6 and one of them suppressed. Ground truth: their IoU computed directly, in float64."""
    a, b = (100.0, 100.0, 101.0, 101.0), (100.35, 100.0, 101.35, 101.0)
    objects = [(0, 0, (600.0, 600.0, 640.0, 640.0), 0.9), (63, 79, a, 0.9), (63, 79, b, 0.8)]
    truth = box_iou(torch.tensor([a], dtype=torch.float64), torch.tensor([b], dtype=torch.float64)).item()
    assert 0.45 < truth < 0.5
    raw = select(head_output(objects, 64, 80), 80, 0.25, 0.5, None, False)
    assert kept(raw) == {(0, 0, (600.0, 600.0, 640.0, 640.0)), (63, 79, a), (63, 79, b)}


def test_nms_never_suppresses_across_classes_when_a_box_reaches_past_the_top_left_corner():
    """Boxes are not clipped before NMS, and one past the input's top-left corner has x, y < 0: torchvision's shift
    of class 1 by (largest coordinate + 1) on every coordinate put it on class 0's box in the bottom-right corner
    (IoU 0.79 there), which it suppressed."""
    corner, outside = (600.0, 600.0, 640.0, 640.0), (-45.0, -45.0, 0.0, 0.0)
    objects = [(0, 0, corner, 0.8), (0, 1, outside, 0.9)]
    raw = select(head_output(objects, 1, 2), 2, 0.25, 0.45, None, False)
    assert kept(raw) == {(0, 0, corner), (0, 1, outside)}


class FakeCopyFence:
    """Stands in, on the CPU, for the CUDA event that fences the staging buffer: `mark` takes the buffer's bytes as
    the device's non-blocking copies would read them (later, when the stream reaches them); `wait` checks that
    nothing has written over them since. Marking again without a wait means the buffer was refilled unfenced."""

    def __init__(self, letterbox: Letterboxer):
        self.letterbox = letterbox
        self.in_flight: tuple[torch.Tensor, torch.Tensor] | None = None
        self.marks = 0

    def mark(self) -> None:
        assert self.in_flight is None, "the staging buffer was refilled while copies out of it could be in flight"
        self.in_flight = (self.letterbox._staging, self.letterbox._staging.clone())
        self.marks += 1

    def wait(self) -> None:
        if self.in_flight is not None:
            buffer, read = self.in_flight
            assert torch.equal(buffer, read), "the staging buffer was written while a copy was still reading it"
            self.in_flight = None


class FakeCudaLetterboxer(Letterboxer):
    """The CUDA upload path (frames stacked into the reused staging buffer, copies fenced) run on the CPU, where
    `Tensor.to` of a host tensor is not a copy at all: the fence stands for what the device would read."""

    def __init__(self, input_size: tuple[int, int]):
        super().__init__(input_size, "cpu")
        self._fence = FakeCopyFence(self)  # type: ignore[assignment]


def test_the_staging_buffer_is_refilled_only_after_the_copies_out_of_it_have_run():
    """Batches that fail after their upload (out of memory in the model, as OomSplitter then retries them in
    halves), then more batches: each upload waits for the last one's copies, and every batch equals what the CPU's
    zero-copy upload gives for the same frames."""
    staged = FakeCudaLetterboxer(INPUT)
    direct = Letterboxer(INPUT, "cpu")
    splitter = OomSplitter("fake device", "cpu")
    uploads = []

    def upload_then_run_out(images):
        batch, _ = staged(list(images))
        uploads.append(len(images))
        if len(images) > 2:
            raise torch.OutOfMemoryError("FakeDevice: out of memory after the upload")
        return list(batch)

    frames = [scene(*s) for s in SCENES]
    batches = [frames + frames[:2], frames[::-1], frames[1:3], [frames[0]] * 3]  # same-size groups too
    for images in batches:
        got = splitter(upload_then_run_out, images)
        want, _ = direct(images)
        assert torch.equal(torch.stack(got), want)
    assert staged._fence.marks == len(uploads) > len(batches), "every upload was fenced, the failed ones too"


def test_a_flipped_view_of_a_frame_is_a_valid_frame():
    """Frames need not be contiguous (e.g. a mirrored camera): a strided view gives what its copy gives."""
    backend = rectangle_backend("detect")
    image = scene(*SCENES[0])
    view = image[:, ::-1]
    (from_view,) = backend.detect([view])
    (from_copy,) = backend.detect([view.copy()])
    np.testing.assert_allclose(from_view.xyxy, from_copy.xyxy)
    width = SCENES[0][0]
    np.testing.assert_allclose(from_view.xyxy[0, [0, 2]], [width - 1500, width - 600], atol=tolerance(1920, 1080))


def test_mask_polygons_stay_inside_the_frame_when_the_box_reaches_into_the_letterbox_border():
    """A 1920x1080 frame in a 640x384 input: scale 1/3, 12 pixels of border above (y < 12) and below."""
    probabilities = np.full((22, 12), 255, np.uint8)  # 4-pixel cells from model y = 0 to 88, x = 200 to 248
    mask = InstanceMask(probabilities, (50, 0), 4.0, (200.0, 0.0, 248.0, 88.0), (1 / 3, 1 / 3), (0.0, 12.0), (1920, 1080))
    points = np.concatenate([np.reshape(p, (-1, 2)) for p in mask.polygons()])
    assert points[:, 1].min() == 0.0, "clipped to the frame's top edge"
    assert (points >= 0).all() and (points[:, 0] <= 1920).all() and (points[:, 1] <= 1080).all()
    full = mask.to_frame()
    assert full[0:228, 600:744].all() and not full[:, :599].any()


def test_a_corrupt_frame_fails_alone_and_is_reported_with_its_camera(caplog):
    cameras = {name: CameraConfig(source=f"{name}.mp4") for name in ("good1", "bad", "good2")}
    config = DetectorConfig(weights="yolov8n.yaml", input_size=(320, 192), confidence=3e-5)
    spec = PluginSpec("detector", Detector, config, dict.fromkeys(cameras, config))
    chain = Chain((spec,), "cpu", cameras)
    chain.start()
    rng = np.random.default_rng(1)
    images = {
        "good1": rng.integers(0, 256, (480, 640, 3), dtype=np.uint8),
        "bad": np.zeros((480, 640), np.float32),  # grey float: not a BGR uint8 frame
        "good2": rng.integers(0, 256, (720, 1280, 3), dtype=np.uint8),
    }
    frames = [Frame(name, 7, time.time(), time.monotonic(), image) for name, image in images.items()]
    with caplog.at_level(logging.ERROR, logger="vigild.chain"):
        passed = chain.process(frames)
    assert [f.camera for f in passed] == ["good1", "good2"]
    assert all(len(f.detections) > 0 for f in passed)
    assert chain.stages[0].failures == {"bad": 1}
    assert "camera bad frame 7" in caplog.text and "(H, W, 3)" in caplog.text
    chain.stop()


OOM_SCRIPT = textwrap.dedent(
    """
    import logging, resource, sys, time
    import numpy as np
    from vigild.pipeline.chain import Chain
    from vigild.config.loading import CameraConfig, PluginSpec
    from vigild.frame import Frame
    from vigild.plugins.detection.detector import Detector, DetectorConfig

    logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(levelname)s %(message)s")
    cameras = {f"cam{i}": CameraConfig(source=f"cam{i}.mp4") for i in range(64)}
    config = DetectorConfig(weights="yolov8n.yaml", input_size=640, confidence=3e-5)
    chain = Chain((PluginSpec("detector", Detector, config, dict.fromkeys(cameras, config)),), "cpu", cameras)
    chain.start()
    backend = chain.stages[0].instances[0][0].backend
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, (480, 640, 3), dtype=np.uint8) for _ in range(64)]
    alone = [backend.detect([images[i]])[0] for i in (0, 63)]
    def batch():
        return [Frame(name, 0, time.time(), time.monotonic(), image) for name, image in zip(cameras, images)]
    # cap this process's address space at what it uses now + 700 MiB: a batch of 64 needs about 2 GiB
    vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + 700 * 2**20, resource.RLIM_INFINITY))
    first, second = batch(), batch()
    passed = [len(chain.process(first)), len(chain.process(second))]
    same = all(np.allclose(np.sort(first[i].detections.xyxy, 0), np.sort(a.xyxy, 0), atol=1) for i, a in zip((0, 63), alone))
    print("RESULT", passed[0], passed[1], backend.oom.limit, same, sum(chain.stages[0].failures.values()))
    """
)


@pytest.mark.timeout(300)
def test_running_out_of_memory_splits_the_batch_and_goes_on(tmp_path):
    """A real allocation failure: the process's address space is capped, then the chain gets 64 frames at once."""
    script = tmp_path / "oom.py"
    script.write_text(OOM_SCRIPT)
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=280)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "out of memory on cpu with a batch of 64" in run.stdout
    result = next(line for line in run.stdout.splitlines() if line.startswith("RESULT")).split()
    assert result[1:3] == ["64", "64"], "every frame of both batches came through the chain"
    assert 1 <= int(result[3]) < 64, "the batch was split"
    assert result[4] == "True", "the split batch found what single frames find"
    assert result[5] == "0", "no frame failed"

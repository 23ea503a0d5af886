"""Ultralytics YOLO models (YOLOv8, YOLO11; detect, segment, pose) run on vigild's own batched device pipeline.

ultralytics loads the model (a `.pt` file, a name it downloads where online, or an architecture `.yaml`, which the
offline tests and benchmarks use) and fuses it; everything around the forward pass is vigild's, so that one call
serves frames of every size from every camera: `Letterboxer` uploads and letterboxes on the device, the raw head
output of the whole batch is thresholded and NMS-ed in one `batched_nms` call (grouped by frame and class, in
float64: see `grouped_nms`), and boxes, masks and keypoints are mapped back to each frame's pixels before the
single copy back to the host. End-to-end heads (NMS-free, e.g. YOLO26) are thresholded only. With `half`, the
head's decoding of boxes and keypoints runs in float32 (`decode_in_float32`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torchvision.ops import batched_nms

from vigild.frame import Detections
from vigild.plugins.detection.backend import DetectorBackend
from vigild.vision.device import OomSplitter, half_dtype
from vigild.vision.letterbox import Geometry, Letterboxer, Resize
from vigild.vision.masks import InstanceMask, MaskFormat

log = logging.getLogger("vigild.plugins.yolo")

MAX_DETECTIONS = 300
"""Per frame, after NMS (as ultralytics)."""


def grouped_nms(xyxy: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, iou: float) -> torch.Tensor:
    """Indices of the boxes NMS keeps within each group (e.g. frame * classes + class), best score first.

    torchvision's `batched_nms` separates the groups by shifting each box by group * (largest coordinate + 1). For a
    batch of 64 frames of 80 classes that shift reaches 5120 * 641 ≈ 3.3e6, where float32 keeps a quarter of a
    pixel: small boxes would be compared at rounded corners. And the shift keeps groups apart only when no
    coordinate is negative, which a box that reaches past the input's edge has. So the boxes go in as float64
    (exact to about 1e-9 pixels there; a few thousand boxes, so the cost is small on any device), moved by their
    smallest coordinate so that none is negative (IoU does not change with a common shift).
    """
    if not len(xyxy):
        return torch.empty(0, dtype=torch.int64, device=xyxy.device)
    boxes = xyxy.double()
    return batched_nms(boxes - boxes.min(), scores.double(), groups, iou)


@dataclass
class RawDetections:
    """The kept objects of a whole batch, still on the device: row i belongs to frame `batch_index[i]`."""

    batch_index: torch.Tensor
    xyxy: torch.Tensor
    """In model-input pixels."""
    confidence: torch.Tensor
    class_id: torch.Tensor
    extra: torch.Tensor
    """Mask coefficients (segment) or raw keypoints (pose) per object; (N, 0) for detect."""


def select(
    preds: torch.Tensor,
    num_classes: int,
    confidence: float,
    nms_iou: float,
    class_filter: torch.Tensor | None,
    end2end: bool,
) -> RawDetections:
    """Threshold and NMS a whole batch of head outputs at once.

    `preds` is (B, 4 + nc + extra, anchors) with boxes as centre/size (the classic head), or (B, k, 6 + extra)
    with [x1, y1, x2, y2, score, class] (an end-to-end head, already one box per object).
    """
    if end2end:
        xyxy, conf, cls, extra = preds[..., :4], preds[..., 4], preds[..., 5].long(), preds[..., 6:]
        keep = conf >= confidence
        if class_filter is not None:
            keep &= torch.isin(cls, class_filter)
        batch_index, row = keep.nonzero(as_tuple=True)
        return RawDetections(batch_index, xyxy[batch_index, row], conf[batch_index, row], cls[batch_index, row],
                             extra[batch_index, row])

    preds = preds.transpose(1, 2)  # (B, anchors, channels)
    scores = preds[..., 4 : 4 + num_classes]
    if class_filter is not None:
        scores = scores[..., class_filter]
    conf, best = scores.max(dim=-1)
    batch_index, anchor = (conf >= confidence).nonzero(as_tuple=True)
    conf = conf[batch_index, anchor]
    cls = best[batch_index, anchor]
    if class_filter is not None:
        cls = class_filter[cls]
    rows = preds[batch_index, anchor]
    centre, size = rows[:, 0:2], rows[:, 2:4]
    xyxy = torch.cat([centre - size / 2, centre + size / 2], dim=1)
    keep = grouped_nms(xyxy, conf, batch_index * num_classes + cls, nms_iou)  # best score first
    # group by frame (stable: best first within a frame) and cap each frame at MAX_DETECTIONS
    keep = keep[torch.argsort(batch_index[keep], stable=True)]
    frames = batch_index[keep]
    first = torch.searchsorted(frames, frames, right=False)
    keep = keep[torch.arange(len(keep), device=keep.device) - first < MAX_DETECTIONS]
    return RawDetections(batch_index[keep], xyxy[keep], conf[keep], cls[keep], rows[keep, 4 + num_classes :])


def instance_masks(coefficients: torch.Tensor, prototypes: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """(N, h, w) uint8 mask probabilities (0-255) at the prototypes' resolution (1/4 of the input for YOLO).

    Rows are grouped by frame (`counts` objects per frame): each frame's objects mix that frame's prototypes in one
    matrix product, so no copy of the prototypes is made per object. Kept small on purpose: upsampling to the
    input's resolution happens on the host, per object and only when its mask is published.
    """
    _, channels, height, width = prototypes.shape
    out = torch.empty((len(coefficients), height, width), dtype=torch.uint8, device=prototypes.device)
    start = 0
    for frame, count in enumerate(counts):  # a loop over frames; the pixels are one matrix product per frame
        if count:
            mixed = coefficients[start : start + count].float() @ prototypes[frame].float().view(channels, -1)
            out[start : start + count] = (mixed.sigmoid_() * 255).round_().to(torch.uint8).view(count, height, width)
            start += count
    return out


class YoloBackend(DetectorBackend):
    """A YOLO-style model on the device: input (B, 3, H, W) RGB 0-1; output as ultralytics' heads in export mode.

    The model is a torch module: an ultralytics model (`load`), the darknet port in that layout
    (vigild.plugins.detection.darknet_torch), or an ONNX Runtime session behind a module
    (vigild.plugins.detection.onnx_runtime). `resize` is how frames become its input: letterboxed (ultralytics) or
    stretched (darknet's training)."""

    channels_last = True
    """The batch's memory layout: channels-last suits torch's CPU and CUDA convolutions; ONNX Runtime takes NCHW."""

    def __init__(
        self,
        model: torch.nn.Module,
        task: str,
        class_names: tuple[str, ...],
        input_size: tuple[int, int],
        confidence: float,
        nms_iou: float,
        device: str,
        half: bool,
        mask_format: MaskFormat = "polygon",
        kpt_shape: tuple[int, int] | None = None,
        end2end: bool = False,
        name: str = "yolo",
        resize: Resize = "letterbox",
    ):
        self.task = task
        self.device = torch.device(device)
        self.dtype = half_dtype(self.device) if half else torch.float32
        self.model = model.eval().to(self.device, self.dtype)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.class_names = class_names
        self.num_classes = len(class_names)
        self.kpt_shape = kpt_shape if task == "pose" else None
        self.end2end = end2end
        self.input_size = input_size
        self.confidence = confidence
        self.nms_iou = nms_iou
        self.mask_format = mask_format
        self.resize = resize
        self.letterbox = Letterboxer(input_size, self.device, self.dtype, channels_last=self.channels_last, resize=resize)
        self.oom = OomSplitter(f"detector {name}", device)
        self._class_filter_device: torch.Tensor | None = None

    @classmethod
    def load(
        cls,
        weights: str,
        input_size: tuple[int, int] | None,
        confidence: float,
        nms_iou: float,
        device: str,
        half: bool,
        mask_format: MaskFormat = "polygon",
    ) -> YoloBackend:
        """Load through ultralytics: a `.pt` file, a name it resolves (downloads where online), or a `.yaml`."""
        loaded = load_ultralytics(weights, input_size)
        if half:  # fp16 on CUDA as bfloat16 on the CPU: neither keeps a 640-pixel coordinate to the pixel
            decode_in_float32(loaded.model.model[-1])
        return cls(
            loaded.model,
            loaded.task,
            loaded.class_names,
            loaded.input_size,
            confidence,
            nms_iou,
            device,
            half,
            mask_format,
            loaded.kpt_shape,
            loaded.end2end,
            weights,
        )

    def detect(self, images: list[np.ndarray]) -> list[Detections]:
        return self.oom(self._detect, images)

    @torch.inference_mode()
    def _detect(self, images: Sequence[np.ndarray]) -> list[Detections]:
        batch, geometry = self.letterbox(list(images))
        output = self.model(batch)
        prototypes = None
        if self.task == "segment":
            output, prototypes = output
        raw = select(output, self.num_classes, self.confidence, self.nms_iou, self._class_filter(), self.end2end)
        return self._to_frames(raw, prototypes, geometry, len(images))

    def _class_filter(self) -> torch.Tensor | None:
        if self.class_filter is None:
            return None
        if self._class_filter_device is None:
            self._class_filter_device = torch.as_tensor(self.class_filter, device=self.device)
        return self._class_filter_device

    def _to_frames(
        self, raw: RawDetections, prototypes: torch.Tensor | None, geometry: Geometry, count: int
    ) -> list[Detections]:
        index = raw.batch_index
        boxes = geometry.boxes_to_frames(raw.xyxy.float(), index)
        keypoints = None
        if self.kpt_shape is not None:
            points = raw.extra.float().view(len(index), *self.kpt_shape)
            xy = geometry.points_to_frames(points[..., :2], index)
            conf = points[..., 2:3] if self.kpt_shape[1] == 3 else torch.ones_like(points[..., :1])
            keypoints = torch.cat([xy, conf], dim=-1).cpu().numpy()
        counts = torch.bincount(index, minlength=count).cpu().tolist()
        masks = None
        if prototypes is not None:
            masks = instance_masks(raw.extra, prototypes, counts)
        # one copy back per kind of result, then split per frame
        index_np = index.cpu().numpy()
        boxes_np = boxes.cpu().numpy()
        conf_np = raw.confidence.float().cpu().numpy()
        cls_np = raw.class_id.to(torch.int32).cpu().numpy()
        mask_objects = self._instance_masks(masks, raw.xyxy, index_np, geometry) if masks is not None else None
        ends = np.cumsum(counts).tolist()
        out = []
        for start, stop in zip([0, *ends[:-1]], ends, strict=True):
            part = slice(start, stop)
            out.append(
                Detections.untracked(
                    boxes_np[part],
                    conf_np[part],
                    cls_np[part],
                    self.class_names,
                    None if mask_objects is None else mask_objects[part],
                    None if keypoints is None else keypoints[part],
                )
            )
        return out

    def _instance_masks(
        self, masks: torch.Tensor, xyxy: torch.Tensor, index: np.ndarray, geometry: Geometry
    ) -> np.ndarray:
        """One `InstanceMask` per object: its box's crop of the low-resolution mask, kept until it is published."""
        host = masks.cpu().numpy()
        scale = geometry.scale.cpu().numpy()
        pad = geometry.pad.cpu().numpy()
        size = geometry.size.cpu().numpy()
        # each box cut to its frame's area in model pixels (not the letterbox border), like the published bbox
        low = np.tile(pad[index], 2)
        high = np.tile(pad[index] + size[index] * scale[index], 2)
        boxes = np.clip(xyxy.float().cpu().numpy(), low, high)
        height, width = host.shape[1:]
        stride = self.input_size[0] / width  # input pixels per prototype pixel (4 for YOLO)
        # the box in prototype pixels, one pixel of margin so that the host's upsampling has its neighbours
        x0 = np.clip(np.floor(boxes[:, 0] / stride) - 1, 0, width - 1).astype(np.int64)
        y0 = np.clip(np.floor(boxes[:, 1] / stride) - 1, 0, height - 1).astype(np.int64)
        x1 = np.clip(np.ceil(boxes[:, 2] / stride) + 1, x0 + 1, width).astype(np.int64)
        y1 = np.clip(np.ceil(boxes[:, 3] / stride) + 1, y0 + 1, height).astype(np.int64)
        frame_size = size.astype(np.int64)
        out = np.empty(len(index), dtype=object)
        for i, b in enumerate(index.tolist()):  # per object: its own copy of its crop, nothing encoded yet
            out[i] = InstanceMask(
                host[i, y0[i] : y1[i], x0[i] : x1[i]].copy(),  # a view would keep the whole batch's masks alive
                (int(x0[i]), int(y0[i])),
                stride,
                (float(boxes[i, 0]), float(boxes[i, 1]), float(boxes[i, 2]), float(boxes[i, 3])),
                (float(scale[b, 0]), float(scale[b, 1])),
                (float(pad[b, 0]), float(pad[b, 1])),
                (int(frame_size[b, 0]), int(frame_size[b, 1])),
                self.mask_format,
            )
        return out


@dataclass
class UltralyticsModel:
    """An ultralytics model ready for the device pipeline (and for `vigild export`): fused, its head in export mode."""

    model: Any
    task: str
    class_names: tuple[str, ...]
    input_size: tuple[int, int]
    kpt_shape: tuple[int, int] | None
    end2end: bool


def load_ultralytics(weights: str, input_size: tuple[int, int] | None) -> UltralyticsModel:
    from ultralytics import YOLO  # imported here: it is slow to import and only this back end needs it

    yolo = YOLO(weights)
    if yolo.task not in ("detect", "segment", "pose"):
        raise ValueError(f"{weights} is a '{yolo.task}' model; the detector runs detect, segment and pose models")
    if not isinstance(yolo.model, torch.nn.Module):
        raise ValueError(f"{weights}: the detector needs a PyTorch model (.pt or .yaml), not an exported one")
    model: Any = yolo.model.fuse()
    head = model.model[-1]
    head.export = True  # the head returns its decoded output alone (with the prototypes for segment)
    stride = int(max(model.stride))
    size = input_size or (640, 640)
    if size[0] % stride or size[1] % stride:
        raise ValueError(f"input_size {list(size)} must be a multiple of the model's stride {stride}")
    names: Any = yolo.names
    class_names = tuple(names[i] for i in range(len(names))) if isinstance(names, dict) else tuple(names)
    kpt_shape = (int(head.kpt_shape[0]), int(head.kpt_shape[1])) if yolo.task == "pose" else None
    return UltralyticsModel(model, yolo.task, class_names, size, kpt_shape, bool(getattr(head, "end2end", False)))


def decode_in_float32(head: Any) -> None:
    """Run the head's box, keypoint and score decoding in float32 when the network runs in float16 or bfloat16.

    bfloat16 keeps 8 bits of mantissa: coordinates of a 640-pixel input would come out in steps of up to 4 pixels;
    float16 keeps 11, steps of 0.5 pixels from 512 to 1024 and of 1 pixel above (a 1280-pixel input). The
    convolutions stay in reduced precision (where the time goes); only the decoding arithmetic is done in float32.
    """
    decode = head._inference

    def in_float32(preds: dict[str, Any]) -> torch.Tensor:
        if isinstance(getattr(head, "dfl", None), torch.nn.Module):
            head.dfl.float()  # the distribution-to-distance layer is part of the decoding (a no-op once float32)
        return decode({k: _as_float32(v) for k, v in preds.items()})

    head._inference = in_float32


def _as_float32(value: Any) -> Any:
    """Tensors, and lists of them (the head's feature maps, from which it takes its anchors' dtype), in float32."""
    if isinstance(value, torch.Tensor):
        return value.float()
    if isinstance(value, list):
        return [v.float() if isinstance(v, torch.Tensor) else v for v in value]
    return value


def batch_shape(input_size: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of the model input for an `input_size` given as (width, height)."""
    return input_size[1], input_size[0]

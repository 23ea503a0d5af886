"""Crops around what moved, at the model's input size, and their detections put back together (docs/motion.md).

`plan_crops` turns the motion gate's regions (frame pixels) into crops with the model input's aspect ratio and at
least its size (a region smaller than the input is cut at full resolution: a small, distant walker keeps its
pixels instead of being scaled down with the whole frame), merged where one crop costs less than two, or None when
the crops would cover most of the frame (the whole frame is then detected, letterboxed as usual).

`join_crops` maps each crop's detections back to the frame and keeps one detection per object: a class-aware NMS
across crops, after dropping each detection cut by a crop's inner edge (one not on the frame's edge) that lies
mostly inside a detection of the same class from another crop that is not cut itself (the object was cut: the
other crop saw it whole). More than `MAX_CROPS` crops on a frame: the whole frame is detected.
"""

from __future__ import annotations

import numpy as np
import torch
import torchvision

from vigild.frame import Detections

EDGE_PX = 2.0
"""A box within this many pixels of a crop's side touches it."""
CUT_INSIDE = 0.6
"""A cut detection whose area lies at least this much inside another one of its class is the same object."""
MAX_CROPS = 4
"""More crops than this on a frame (regions spread over a large frame): the whole frame is detected instead."""


def plan_crops(
    regions: np.ndarray, frame_size: tuple[int, int], input_size: tuple[int, int], full_above: float
) -> np.ndarray | None:
    """(M, 4) int64 xyxy crops of a `frame_size` (width, height) frame covering `regions` (N, 4 xyxy), each with
    `input_size`'s aspect ratio where the frame allows and at least its size; None: detect the whole frame."""
    width, height = frame_size
    if len(regions) == 0:
        return None
    crops = _fit(regions, frame_size, input_size)
    changed = True
    while changed and len(crops) > 1:  # merge the pair whose one crop costs least against the two (a few crops)
        changed = False
        area = _area(crops)
        lo = np.minimum(crops[:, None, :2], crops[None, :, :2])
        hi = np.maximum(crops[:, None, 2:], crops[None, :, 2:])
        union = np.prod(hi - lo, axis=2)
        gain = area[:, None] + area[None, :] - union
        np.fill_diagonal(gain, -np.inf)
        i, j = np.unravel_index(int(np.argmax(gain)), gain.shape)
        if gain[i, j] >= 0:
            merged = _fit(np.concatenate([lo[i, j], hi[i, j]]), frame_size, input_size)
            crops = np.concatenate([np.delete(crops, [i, j], axis=0), merged])
            changed = True
    if len(crops) > MAX_CROPS or _area(crops).sum() > full_above * width * height:
        return None
    return crops


def _area(boxes: np.ndarray) -> np.ndarray:
    return np.prod((boxes[:, 2:] - boxes[:, :2]).astype(np.float64), axis=1)


def _fit(boxes: np.ndarray, frame_size: tuple[int, int], input_size: tuple[int, int]) -> np.ndarray:
    """(N, 4) `boxes` grown about their centres to `input_size`'s aspect ratio and at least its size, moved inside
    the frame, and cut to it where the frame is smaller."""
    width, height = frame_size
    in_w, in_h = input_size
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    scale = np.maximum(np.maximum((boxes[:, 2] - boxes[:, 0]) / in_w, (boxes[:, 3] - boxes[:, 1]) / in_h), 1.0)
    w, h = np.minimum(in_w * scale, width), np.minimum(in_h * scale, height)
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    left = np.minimum(np.maximum(cx - w / 2, 0.0), width - w)
    top = np.minimum(np.maximum(cy - h / 2, 0.0), height - h)
    return np.round(np.stack([left, top, left + w, top + h], axis=1)).astype(np.int64)


def join_crops(
    found: list[Detections], crops: np.ndarray, frame_size: tuple[int, int], nms_iou: float
) -> Detections:
    """One frame's detections from those of its `crops` (each in its crop's pixels)."""
    if len(found) == 1:
        return _shifted(found[0], crops[0])
    shifted = [_shifted(detections, crop) for detections, crop in zip(found, crops, strict=True)]
    sizes = [len(detections) for detections in shifted]
    if sum(sizes) == 0:
        return shifted[0]
    joined = _concatenate(shifted)
    crop_of = np.repeat(np.arange(len(crops)), sizes)
    whole = ~_cut_duplicates(joined, crops[crop_of], frame_size)  # first: a cut box must not win the NMS
    joined = joined[whole]
    keep = torchvision.ops.batched_nms(
        torch.from_numpy(joined.xyxy),
        torch.from_numpy(joined.confidence),
        torch.from_numpy(joined.class_id.astype(np.int64)),
        nms_iou,
    ).numpy()
    keep.sort()
    return joined[keep]


def _shifted(detections: Detections, crop: np.ndarray) -> Detections:
    """`detections` of a crop, in frame pixels."""
    if len(detections) == 0 or (crop[0] == 0 and crop[1] == 0):
        return detections
    offset = crop[:2].astype(np.float32)
    keypoints = detections.keypoints
    if keypoints is not None:
        keypoints = keypoints.copy()
        keypoints[..., :2] += offset
    return Detections(detections.xyxy + np.tile(offset, 2), detections.confidence, detections.class_id,
                      detections.tracker_id, detections.class_names, detections.masks, keypoints,
                      detections.data)  # fmt: skip


def _concatenate(parts: list[Detections]) -> Detections:
    first = parts[0]
    keypoints = None
    if all(part.keypoints is not None for part in parts):
        keypoints = np.concatenate([part.keypoints for part in parts if part.keypoints is not None])
    masks = None
    if all(part.masks is not None for part in parts):
        masks = np.concatenate([part.masks for part in parts if part.masks is not None])
    return Detections(
        np.concatenate([part.xyxy for part in parts]),
        np.concatenate([part.confidence for part in parts]),
        np.concatenate([part.class_id for part in parts]),
        np.concatenate([part.tracker_id for part in parts]),
        first.class_names,
        masks,
        keypoints,
    )


def _cut_duplicates(detections: Detections, crop: np.ndarray, frame_size: tuple[int, int]) -> np.ndarray:
    """Per detection: it touches an inner side of its crop and lies mostly inside another detection of its class
    from another crop."""
    width, height = frame_size
    xyxy = detections.xyxy
    inner = np.array([crop[:, 0] > 0, crop[:, 1] > 0, crop[:, 2] < width, crop[:, 3] < height]).T
    touches = (np.abs(xyxy - crop.astype(np.float32)) <= EDGE_PX) & inner
    cut = touches.any(axis=1)
    if not cut.any():
        return cut
    rows = np.flatnonzero(cut)  # only the cut ones are compared: (cut, N), not (N, N)
    lo = np.maximum(xyxy[rows, None, :2], xyxy[None, :, :2])
    hi = np.minimum(xyxy[rows, None, 2:], xyxy[None, :, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=2)
    own = np.maximum(np.prod(xyxy[rows, 2:] - xyxy[rows, :2], axis=1), 1e-6)
    same = detections.class_id[rows, None] == detections.class_id[None, :]
    other_crop = (crop[rows, None, :] != crop[None, :, :]).any(axis=2)
    # inside a box that is not cut itself: two cut halves of one object are both kept (the NMS picks between them)
    inside = (inter / own[:, None] >= CUT_INSIDE) & same & other_crop & ~cut[None, :]
    duplicate = np.zeros(len(xyxy), bool)
    duplicate[rows] = inside.any(axis=1)
    return duplicate

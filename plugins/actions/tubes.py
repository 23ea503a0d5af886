"""Tubes: for each tracked object, the last T crops around its box, kept on the compute device.

Crops are cut with `torchvision.ops.roi_align` from the frame on the device (one upload per sampled frame: the
smallest rectangle holding every wanted box and the pixel around it, not the whole image), as squares around the
box with a context margin, resized to the model's size, and stored as uint8 in one preallocated pool: a slot per
track, a ring of T frames per slot. Slots are reused when tracks end, so memory stays flat while tracks come and go.
`LastSightings` keeps, per slot, the detection its track was last cut from (for the events that outlive it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
from torchvision.ops import roi_align

from vigild.frame import Detections


def square_boxes(xyxy: np.ndarray, margin: float, width: int, height: int) -> np.ndarray:
    """(N, 4) boxes -> squares around their centres, side = longer edge x (1 + 2 x margin), clipped to the frame
    where they can be shifted inside it (float32)."""
    centre = (xyxy[:, :2] + xyxy[:, 2:]) / 2
    side = (xyxy[:, 2:] - xyxy[:, :2]).max(axis=1, keepdims=True) * (1 + 2 * margin)
    side = np.minimum(side, min(width, height))
    low = np.clip(centre - side / 2, 0, np.array([width, height]) - side)
    return np.concatenate([low, low + side], axis=1).astype(np.float32)


class TubeCutter:
    """Cuts (K, 3, S, S) uint8 RGB crops of given boxes out of one BGR frame, on `device`.

    The region and the boxes are float32 on every device, whatever precision the model runs in: the crops end as
    uint8 anyway, and float16 boxes would move by whole pixels (its step is 1 px from 1024 to 2048, 2 px beyond),
    so a crop far right in a wide frame would be misplaced."""

    def __init__(self, size: int, device: torch.device):
        self.size = size
        self.device = device

    def __call__(self, image: np.ndarray, boxes: np.ndarray) -> torch.Tensor:
        """Each crop pixel is the mean of four bilinear samples `d` pixels apart around its centre, where `d` is
        half the box's step (its side / the crop's side) rounded, at least 1: roi_align's sampling_ratio=2 (four
        samples a quarter of a step around the centre), exactly for a box whose step is 2d. It is computed as a
        2x2 mean filter dilated by `d` over the region, then one bilinear sample a crop pixel (interpolation is
        linear): a quarter of roi_align's work, which on a CPU is most of the cut."""
        if not len(boxes):
            return torch.zeros((0, 3, self.size, self.size), dtype=torch.uint8, device=self.device)
        sides = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
        spacing = np.maximum(1, np.rint(sides / self.size / 2)).astype(np.int64)
        if (spacing == spacing[0]).all():
            return self._cut(image, boxes, int(spacing[0]))
        crops = torch.empty((len(boxes), 3, self.size, self.size), dtype=torch.uint8, device=self.device)
        for d in np.unique(spacing):  # a few sizes of filter (people near and far), not a loop over boxes
            rows = np.flatnonzero(spacing == d)
            crops[torch.from_numpy(rows).to(self.device)] = self._cut(image, boxes[rows], int(d))
        return crops

    def _cut(self, image: np.ndarray, boxes: np.ndarray, d: int) -> torch.Tensor:
        height, width = image.shape[:2]
        d = max(1, min(d, width - 1, height - 1))
        # d + 1 pixels more on each side: the filter reaches d pixels on, and the bilinear samples between pixels;
        # cut closer, the edge of the region would stand for the frame's.
        x0, y0 = (np.floor(boxes[:, :2].min(axis=0)).astype(int) - d - 1).clip(0)
        x1, y1 = np.ceil(boxes[:, 2:].max(axis=0)).astype(int) + d + 1
        x1, y1 = min(int(x1), width), min(int(y1), height)
        x1, y1 = max(x1, min(x0 + d + 1, width)), max(y1, min(y0 + d + 1, height))  # the filter needs d + 1
        region = self._planar(image[y0:y1, x0:x1])
        smooth = region[..., :-d, :-d] + region[..., d:, :-d]
        smooth += region[..., :-d, d:]
        smooth += region[..., d:, d:]
        smooth *= 0.25
        # pixel j of the filtered region is centred on pixel j + d/2 of the region
        shifted = boxes.astype(np.float32) - np.array([x0, y0, x0, y0], np.float32) - np.float32(d / 2)
        rois = torch.from_numpy(shifted).to(self.device, torch.float32)
        crops = roi_align(smooth, [rois], output_size=self.size, spatial_scale=1.0, sampling_ratio=1, aligned=True)
        return crops.round_().clamp_(0, 255).to(torch.uint8)

    def _planar(self, region: np.ndarray) -> torch.Tensor:
        """(1, 3, H, W) contiguous float32 RGB on the device, from an HWC BGR uint8 view: roi_align reads a strided
        view about 1.4x slower on the CPU. On a CPU, OpenCV splits the planes (1.4 ms for 768x576, against 6 ms for
        torch's permute, flip and convert); elsewhere the uint8 region is uploaded and converted there."""
        if self.device.type == "cpu":
            planes = cv2.split(region)[::-1]
            return torch.from_numpy(np.stack(planes).astype(np.float32))[None]
        uploaded = torch.from_numpy(np.ascontiguousarray(region)).to(self.device, non_blocking=True)
        return uploaded.permute(2, 0, 1).flip(0)[None].to(torch.float32).contiguous()


class TubePool:
    """Preallocated (capacity, T, 3, S, S) uint8 rings; a slot per live track."""

    def __init__(self, capacity: int, clip_len: int, size: int, device: torch.device):
        self.capacity = capacity
        self.clip_len = clip_len
        self.frames = torch.zeros((capacity, clip_len, 3, size, size), dtype=torch.uint8, device=device)
        self.written = np.zeros(capacity, np.int64)
        """Crops written to each slot since it was taken; the ring position is written % clip_len."""
        self._free = list(range(capacity - 1, -1, -1))

    @property
    def in_use(self) -> int:
        return self.capacity - len(self._free)

    def take(self, count: int) -> np.ndarray:
        """Up to `count` free slots (fewer when the pool is full)."""
        count = min(count, len(self._free))
        slots = np.array([self._free.pop() for _ in range(count)], np.int64)
        self.written[slots] = 0
        return slots

    def give_back(self, slots: np.ndarray) -> None:
        self._free.extend(int(s) for s in slots)

    def write(self, slots: np.ndarray, crops: torch.Tensor) -> None:
        """One crop per slot (each slot at most once per call)."""
        if not len(slots):
            return
        position = torch.from_numpy(self.written[slots] % self.clip_len).to(self.frames.device)
        self.frames[torch.from_numpy(slots).to(self.frames.device), position] = crops
        self.written[slots] += 1

    def clips(self, slots: np.ndarray) -> torch.Tensor:
        """(K, 3, T, S, S) uint8, oldest crop first."""
        start = self.written[slots][:, None]
        order = (start + np.arange(self.clip_len)[None, :]) % self.clip_len  # ring position of oldest..newest
        index = torch.from_numpy(order).to(self.frames.device)
        rows = torch.from_numpy(slots).to(self.frames.device)[:, None]
        return self.frames[rows, index].permute(0, 2, 1, 3, 4)


@dataclass
class CameraTubes:
    """A camera's tracks that have a tube: their ids, sorted, and their slots; `samples` counts its frames."""

    samples: int = 0
    track_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    slots: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def slots_of(self, ids: np.ndarray) -> np.ndarray:
        """The slot of each of these track ids, -1 for a track without a tube."""
        if not len(self.track_ids):
            return np.full(len(ids), -1, np.int64)
        where = np.minimum(np.searchsorted(self.track_ids, ids), len(self.track_ids) - 1)
        return np.where(self.track_ids[where] == ids, self.slots[where], -1)


class LastSightings:
    """Per slot, the detection its track was last cut from: that row's box, confidence, class, mask and keypoints
    as columns, never the frame's detections (which would keep every object of the frame, masks and all)."""

    def __init__(self, capacity: int):
        self.xyxy = np.zeros((capacity, 4), np.float32)
        self.confidence = np.zeros(capacity, np.float32)
        self.class_id = np.zeros(capacity, np.int32)
        self.names, self.masks, self.keypoints = (np.full(capacity, None, object) for _ in range(3))
        self.held = np.zeros(capacity, bool)

    def put(self, slots: np.ndarray, detections: Detections, rows: np.ndarray) -> None:
        self.xyxy[slots], self.confidence[slots] = detections.xyxy[rows], detections.confidence[rows]
        self.class_id[slots] = detections.class_id[rows]
        names = np.empty(1, object)
        names[0] = detections.class_names  # broadcast as one object, not as the sequence of names it also is
        self.names[slots] = names
        self.masks[slots] = None if detections.masks is None else detections.masks[rows]
        points = detections.keypoints
        self.keypoints[slots] = None if points is None else np.fromiter(points[rows], object, len(rows))
        self.held[slots] = True

    def drop(self, slots: np.ndarray) -> None:
        self.names[slots] = self.masks[slots] = self.keypoints[slots] = None
        self.held[slots] = False

    def get(self, slot: int, track_id: int) -> Detections:
        """The slot's sighting as one detection, with `track_id`."""
        at = slice(slot, slot + 1)
        return Detections.of_rows(self.xyxy[at], self.confidence[at], self.class_id[at], np.array([track_id]),
                                  self.names[at], self.masks[at], self.keypoints[at])  # fmt: skip

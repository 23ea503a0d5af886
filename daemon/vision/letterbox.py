"""Frames to a model's input tensor on the model's device: upload, letterbox, normalise, one batch at a time.

Frames of any sizes go into one (B, 3, H, W) tensor of the model's fixed input size, each scaled to fit and
centred on grey padding (ultralytics' letterbox, value 114), so that a frame gives the same input whatever it is
batched with. Models trained on frames stretched to the input size (darknet's, through OpenCV's `blobFromImages`)
take `resize="stretch"`: each frame fills the input, scaled on each axis on its own. The uint8 pixels travel to the device (4x fewer bytes than floats) through a reused page-locked host
buffer with non-blocking copies, which is written again only once the device has read it (`CopyFence`);
conversion, resizing and normalisation run there, as tensor operations over each group of same-sized frames (no
loop over pixels). On the CPU each frame is resized by OpenCV (bilinear, as `blobFromImages` and ultralytics' own
letterbox do, so that a darknet model sees the pixels OpenCV DNN gives it), straight from where it lies. `Geometry` maps model coordinates back to each frame.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
import torch
import torch.nn.functional as F

# Frames from capture workers are read-only views of shared memory (vigild.capture.shm), and torch warns when it
# wraps one. The CPU path below only reads the tensor it makes of a frame (it is the source the letterbox resizes
# into a new batch), so the warning says nothing here.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)

PAD_VALUE = 114
"""Grey of the letterbox border, as in ultralytics (so its models see what they were trained on)."""


class FrameRejected(ValueError):
    """A frame that cannot be a model input (wrong shape or dtype); only that frame fails."""


def check_frame(image: object) -> None:
    if not isinstance(image, np.ndarray):
        raise FrameRejected(f"expected a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
        raise FrameRejected(f"expected a BGR uint8 image of shape (H, W, 3), got {image.dtype} {image.shape}")


def sort_frames(images: Sequence[object]) -> tuple[list[int], dict[int, Exception]]:
    """(positions of the images that can be model inputs, {position: why not} for the others): what a batched
    plugin runs, and what it reports with `FrameErrors`."""
    usable: list[int] = []
    rejected: dict[int, Exception] = {}
    for position, image in enumerate(images):
        try:
            check_frame(image)
        except FrameRejected as exc:
            rejected[position] = exc
            continue
        usable.append(position)
    return usable, rejected


@dataclass(frozen=True)
class Geometry:
    """Where each frame sits in the batch tensor: model pixel = frame pixel * scale + pad, per axis.

    scale: (B, 2) float32 (x, y: equal when letterboxed, not when stretched); pad: (B, 2) float32 (left, top); size: (B, 2) float32 (width, height) of the frame;
    all on the model's device. inner: (B, 4) int64 (x0, y0, x1, y1) of the frame's pixels inside the input.
    """

    scale: torch.Tensor
    pad: torch.Tensor
    size: torch.Tensor
    inner: torch.Tensor

    def boxes_to_frames(self, xyxy: torch.Tensor, batch_index: torch.Tensor) -> torch.Tensor:
        """(N, 4) boxes in model pixels of frames `batch_index` → each frame's pixels, clipped to the frame."""
        pad = self.pad[batch_index].repeat(1, 2)
        out = (xyxy - pad) / self.scale[batch_index].repeat(1, 2)
        limit = self.size[batch_index].repeat(1, 2)
        return torch.minimum(out.clamp_(min=0), limit)

    def points_to_frames(self, xy: torch.Tensor, batch_index: torch.Tensor) -> torch.Tensor:
        """(N, K, 2) points in model pixels → frame pixels (not clipped: keypoints may lie outside)."""
        return (xy - self.pad[batch_index, None, :]) / self.scale[batch_index, None, :]


Resize = Literal["letterbox", "stretch"]


def fit(
    width: int, height: int, input_size: tuple[int, int], resize: Resize = "letterbox"
) -> tuple[float, float, int, int, int, int]:
    """(x scale, y scale, scaled width, scaled height, left pad, top pad) of a frame put into `input_size` (w, h):
    letterboxed (one scale, centred) or stretched (each axis to fill the input)."""
    in_w, in_h = input_size
    if resize == "stretch":
        return in_w / width, in_h / height, in_w, in_h, 0, 0
    scale = min(in_w / width, in_h / height)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    return scale, scale, new_w, new_h, (in_w - new_w) // 2, (in_h - new_h) // 2


class CopyFence:
    """When the device has read what non-blocking copies took from a page-locked host buffer.

    Such a copy returns at once and reads its source only when the device's stream reaches it, so the host must not
    write the buffer again before then: a batch that failed after its upload (out of memory, then retried in halves
    by `OomSplitter`) would otherwise have its next upload written under a copy still in flight. One CUDA event,
    recorded on the device's current stream (the stream `Tensor.to` copies on) after the copies and waited on
    before the next write; when the previous batch was already read back, the wait returns at once.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.event = torch.cuda.Event()  # created on the device at its first record

    def mark(self) -> None:
        """After enqueuing the copies out of the buffer."""
        self.event.record(torch.cuda.current_stream(self.device))

    def wait(self) -> None:
        """Before writing the buffer: blocks until the copies marked last have run (at once if none was marked)."""
        self.event.synchronize()


class Letterboxer:
    """Turns a list of BGR uint8 frames into a normalised RGB batch on `device`; reuse one per model."""

    def __init__(
        self,
        input_size: tuple[int, int],
        device: torch.device | str,
        dtype: torch.dtype = torch.float32,
        mean: tuple[float, float, float] = (0.0, 0.0, 0.0),
        std: tuple[float, float, float] = (1.0, 1.0, 1.0),
        channels_last: bool = True,
        resize: Resize = "letterbox",
    ):
        self.input_size = input_size
        self.resize = resize
        self.device = torch.device(device)
        self.dtype = dtype
        self.channels_last = channels_last
        # (pixel / 255 - mean) / std as one multiply and one subtract, per RGB channel
        std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        work = torch.float32 if self.device.type == "cpu" else dtype
        self._scale = (1.0 / (255.0 * std_t)).to(self.device, work)
        self._shift = (mean_t / std_t).to(self.device, work)
        self._pinned = self.device.type == "cuda"
        self._staging = torch.empty(0, dtype=torch.uint8, pin_memory=self._pinned)
        self._fence: CopyFence | None = CopyFence(self.device) if self._pinned else None
        """Guards `_staging` on CUDA; None on the CPU, where frames are used where they lie and nothing is staged."""

    def _staging_view(self, count: int, height: int, width: int, offset: int) -> torch.Tensor:
        """A (count, H, W, 3) uint8 slice of the reused host buffer, starting `offset` bytes in."""
        nbytes = count * height * width * 3
        return self._staging[offset : offset + nbytes].view(count, height, width, 3)

    def _reserve(self, nbytes: int) -> None:
        if self._staging.numel() < nbytes:
            # grow with headroom so that small changes in the mix of frame sizes do not reallocate (pinning is slow)
            self._staging = torch.empty(int(nbytes * 1.25), dtype=torch.uint8, pin_memory=self._pinned)

    def __call__(self, images: list[np.ndarray]) -> tuple[torch.Tensor, Geometry]:
        """Every image must have passed `check_frame`. Returns the (B, 3, H, W) input and its `Geometry`."""
        in_w, in_h = self.input_size
        count = len(images)
        # the CPU's bfloat16 arithmetic is slow: build the batch in float32 there and convert it once at the end
        work = torch.float32 if self.device.type == "cpu" else self.dtype
        # filled in raw pixel units (0-255, RGB); scaled and normalised once for the whole batch at the end
        batch = torch.full((count, 3, in_h, in_w), float(PAD_VALUE), dtype=work, device=self.device)
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        geometry = np.zeros((count, 8), np.float32)  # scale x, y, pad x, y, width, height, scaled w, h
        for members, pixels in self._upload(images):
            height, width = pixels.shape[1:3]
            scale_x, scale_y, new_w, new_h, left, top = fit(width, height, self.input_size, self.resize)
            if self.device.type == "cpu":
                if (new_h, new_w) != (height, width):  # OpenCV's resize, as OpenCV's and ultralytics' own
                    # pre-processing (torch's uint8 bilinear rounds differently: a level off on a sixth of pixels)
                    pixels = torch.from_numpy(cv2.resize(pixels[0].numpy(), (new_w, new_h)))[None]
                group = pixels.permute(0, 3, 1, 2)  # NHWC uint8 -> an NCHW view, channels-last in memory: no copy
            else:
                group = pixels.permute(0, 3, 1, 2).to(self.dtype)  # CUDA resizes floats
                if (new_h, new_w) != (height, width):
                    group = F.interpolate(group, size=(new_h, new_w), mode="bilinear", align_corners=False)
            target = batch[:, :, top : top + new_h, left : left + new_w]
            if len(members) == count:
                target.copy_(group.flip(1))  # BGR -> RGB
            else:
                target[torch.tensor(members, device=self.device)] = group.flip(1).to(work)
            geometry[members] = (scale_x, scale_y, left, top, width, height, new_w, new_h)
        batch.mul_(self._scale).sub_(self._shift)
        if batch.dtype != self.dtype:
            batch = batch.to(self.dtype)
        geo = torch.from_numpy(geometry).to(self.device, non_blocking=True)
        inner = torch.cat([geo[:, 2:4], geo[:, 2:4] + geo[:, 6:8]], dim=1).round().long()
        return batch, Geometry(scale=geo[:, 0:2], pad=geo[:, 2:4], size=geo[:, 4:6], inner=inner)

    def _upload(self, images: list[np.ndarray]) -> list[tuple[list[int], torch.Tensor]]:
        """(batch positions, (n, H, W, 3) uint8 on the device) per group of same-sized frames.

        CUDA: each group is stacked into the reused pinned buffer (the one host copy) and copied asynchronously,
        after the copies of the previous call have read the buffer.
        CPU: each frame is used where it lies (a zero-copy view), one group per frame.
        """
        if self._fence is None:
            # ascontiguousarray: a no-op for frames from capture; flipped or strided views get copied once. The tensor
            # may wrap a read-only frame (capture workers): it is only read
            return [([i], torch.from_numpy(np.ascontiguousarray(image))[None]) for i, image in enumerate(images)]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            groups.setdefault(image.shape[:2], []).append(i)
        self._fence.wait()  # the previous call's copies may still be reading the buffer (or the one _reserve drops)
        self._reserve(sum(image.nbytes for image in images))
        out: list[tuple[list[int], torch.Tensor]] = []
        offset = 0
        try:
            for (height, width), members in groups.items():
                host = self._staging_view(len(members), height, width, offset)
                offset += host.numel()
                np.stack([images[i] for i in members], out=host.numpy())
                out.append((members, host.to(self.device, non_blocking=True)))
        finally:
            if out:
                self._fence.mark()
        return out

"""Darknet `.cfg` + `.weights` detectors (YOLOv3/v4-tiny, Yolo-Fastest...) through OpenCV's DNN module.

OpenCV 5.0 removed the darknet importer, so vigild pins opencv-python below 5: OpenCV's DNN is the field's
maintained runtime for these models and runs Yolo-Fastest-XL at about 15 frames/s on two CPU cores. Decoding and
NMS are vectorised over the whole batch (one `grouped_nms` call, grouped by frame and class). On `cuda:N`, with an
OpenCV built with CUDA (the pip wheels are not), the network runs on GPU N in fp16 or fp32 as `half` says
(`dnn_placement`; this path has never been run). The cfg and the weights file's size are checked with the port's
bounds (darknet_cfg.py) before OpenCV reads them.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from vigild.frame import Detections
from vigild.plugin import MAX_LIST_FILE_BYTES, read_list_file
from vigild.plugins.detection.backend import DetectorBackend
from vigild.plugins.detection.darknet_cfg import parse_cfg, plan_cfg, read_cfg, weights_header
from vigild.plugins.detection.yolo import grouped_nms

log = logging.getLogger("vigild.plugins.darknet")


def with_score_floor(cfg_text: str, confidence: float) -> str:
    """The cfg with `thresh=confidence` in every [yolo] section.

    OpenCV's YOLO layer zeroes class scores below its `thresh` (0.2 unless the cfg says otherwise), which would
    silently override a lower `confidence` (ByteTrack wants boxes down to 0.1 for its second matching stage).
    """
    without = re.sub(r"(?m)^[ \t]*thresh[ \t]*=.*$", "", cfg_text)
    return re.sub(r"(?m)^[ \t]*\[yolo\][ \t]*$", f"[yolo]\nthresh={confidence}", without)


MAX_NAMES_BYTES = MAX_LIST_FILE_BYTES


def read_names(path: Path | None, count: int = 0) -> tuple[str, ...]:
    """Class names, one a line; `count` numbered names without a file. Errors name the file, never its content."""
    if path is None:
        return tuple(str(i) for i in range(count))
    return read_list_file(path, "names", "names")


def dnn_placement(device: str, half: bool) -> tuple[int, int, int | None]:
    """(OpenCV DNN backend, target, CUDA device index or None) for a vigild device and `half`.

    `cpu` → OpenCV's own backend on the CPU (`half` has no CPU target there); `cuda` or `cuda:N` → the CUDA backend
    on GPU N (0 for `cuda`), with the FP16 target only when `half` is on.
    """
    parsed = torch.device(device)
    if parsed.type == "cpu":
        return cv2.dnn.DNN_BACKEND_OPENCV, cv2.dnn.DNN_TARGET_CPU, None
    if parsed.type != "cuda":
        raise ValueError(f"the darknet detector runs on cpu or cuda[:N], not on {device!r}")
    target = cv2.dnn.DNN_TARGET_CUDA_FP16 if half else cv2.dnn.DNN_TARGET_CUDA
    return cv2.dnn.DNN_BACKEND_CUDA, target, parsed.index or 0


@dataclass(frozen=True)
class DarknetSpec:
    """What a darknet back end is built from (OpenCV DNN's here, the torch port's in darknet_torch.py)."""

    cfg: Path
    weights: Path
    names: Path | None
    input_size: tuple[int, int] | None
    """None: the cfg's."""
    confidence: float
    nms_iou: float
    device: str
    half: bool = False


class DarknetBackend(DetectorBackend):
    def __init__(self, spec: DarknetSpec):
        cfg, weights, names, input_size = spec.cfg, spec.weights, spec.names, spec.input_size
        confidence, nms_iou, device, half = spec.confidence, spec.nms_iou, spec.device, spec.half
        cfg_text = read_cfg(cfg)
        plan = plan_cfg(parse_cfg(cfg_text, cfg), input_size)  # bounded before OpenCV allocates what it asks for
        weights_header(weights, plan.parameters, exact=False)  # (OpenCV reads what it needs, ignores the rest)
        self.net = cv2.dnn.readNetFromDarknet(
            np.frombuffer(with_score_floor(cfg_text, confidence).encode(), np.uint8),
            np.fromfile(weights, np.uint8),
        )
        backend, target, cuda_index = dnn_placement(device, half)
        self.cuda_index: int | None = None
        """The GPU the network runs on; None on the CPU."""
        if cuda_index is not None:
            if cv2.cuda.getCudaEnabledDeviceCount() > cuda_index:
                self.net.setPreferableBackend(backend)
                self.net.setPreferableTarget(target)
                self.cuda_index = cuda_index
            else:
                log.warning("this OpenCV sees no CUDA device %d: the darknet detector runs on the CPU", cuda_index)
        self.output_names = self.net.getUnconnectedOutLayersNames()
        self.input_size = input_size or plan.net_size
        self.confidence = confidence
        self.nms_iou = nms_iou
        self.class_names = read_names(names, 80)

    def detect(self, images: list[np.ndarray]) -> list[Detections]:
        if self.cuda_index is not None:
            # OpenCV's CUDA backend sets the network up at its first forward, and runs it, on the calling thread's
            # current device (the daemon runs every plugin of a chain on one device, so this is that device)
            cv2.cuda.setDevice(self.cuda_index)
        blob = cv2.dnn.blobFromImages(images, 1 / 255.0, self.input_size, swapRB=True, crop=False)
        self.net.setInput(blob)
        outputs = self.net.forward(self.output_names)  # per YOLO head: (N, rows, 5 + classes), or (rows, ...) for N=1
        raw = np.concatenate([out.reshape(len(images), -1, out.shape[-1]) for out in outputs], axis=1)  # cx cy w h
        scores = raw[..., 5:]  # OpenCV's region layer already multiplies in the objectness
        if self.class_filter is not None:
            scores = scores[..., self.class_filter]
        best = scores.argmax(axis=-1)
        confidence = np.take_along_axis(scores, best[..., None], axis=-1)[..., 0]
        frame_idx, row_idx = np.nonzero(confidence >= self.confidence)
        class_id = best[frame_idx, row_idx]
        if self.class_filter is not None:
            class_id = self.class_filter[class_id]
        conf = confidence[frame_idx, row_idx]

        sizes = np.array([(image.shape[1], image.shape[0]) for image in images], np.float32)  # (N, 2) w, h
        scale = sizes[frame_idx]
        centre = raw[frame_idx, row_idx, 0:2] * scale
        half = raw[frame_idx, row_idx, 2:4] * scale / 2
        xyxy = np.concatenate([centre - half, centre + half], axis=1)
        np.clip(xyxy, 0, np.tile(scale, 2), out=xyxy)

        groups = frame_idx.astype(np.int64) * (raw.shape[-1] - 5) + class_id  # NMS within one frame and class
        keep = grouped_nms(torch.from_numpy(xyxy), torch.from_numpy(conf), torch.from_numpy(groups), self.nms_iou).numpy()
        keep = keep[np.argsort(frame_idx[keep], kind="stable")]  # by frame, best score first within a frame
        bounds = np.searchsorted(frame_idx[keep], np.arange(1, len(images)))
        return [
            Detections.untracked(xyxy[part], conf[part], class_id[part], self.class_names)
            for part in np.split(keep, bounds)
        ]

"""Live pictures for the console: each processed frame of a watched camera, as one JPEG with that frame's boxes.

The scheduler offers every frame it finished (`LiveFeed.offer`, on its thread): for a camera nobody watches that is
one set lookup; for a watched one the frame replaces the camera's previous one (the newest only: in workers mode it
holds one shared-memory slot). The feed's own thread encodes at most `live_fps` frames a second per watched camera,
once whatever the number of viewers, and hands the same message to each viewer, who keeps only the newest (a slow
viewer skips frames; it never holds up the others, the encoder or the chain).

A message is binary: 4 bytes (big-endian) of header length, the header as JSON (`camera`, `frame`, `ts`, `width`,
`height` of the frame, `scale` of the picture, `boxes`: `[[x1, y1, x2, y2, track_id, label, confidence], ...]` in
frame pixels), then the JPEG.
"""

from __future__ import annotations

import json
import logging
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from vigild.frame import Frame
from vigild.lifecycle import ServiceThread

log = logging.getLogger("vigild.web")

Viewer = Callable[[bytes], None]


@dataclass
class _Camera:
    viewers: set[int]
    frame: Frame | None = None
    encoded_at: float = 0.0
    encoded: int = 0


class LiveFeed:
    def __init__(self, fps: float, quality: int, max_side: int):
        self.period = 1.0 / fps
        self.quality = quality
        self.max_side = max_side
        self._cameras: dict[str, _Camera] = {}
        self._viewers: dict[int, Viewer] = {}
        self._next_id = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread = ServiceThread("web-live", self._serve)
        self.encoded = 0
        """JPEGs encoded since start (one per frame sent, whatever the number of viewers)."""

    # ----- the scheduler's side

    def offer(self, frame: Frame) -> None:
        """A frame the chain finished (never blocks: nothing but a reference kept for a watched camera)."""
        camera = self._cameras.get(frame.camera)
        if camera is not None:
            camera.frame = frame
            self._wake.set()

    # ----- the viewers' side

    def watch(self, camera: str, viewer: Viewer) -> int:
        with self._lock:
            self._next_id += 1
            self._viewers[self._next_id] = viewer
            self._cameras.setdefault(camera, _Camera(set())).viewers.add(self._next_id)
            return self._next_id

    def leave(self, camera: str, viewer_id: int) -> None:
        with self._lock:
            self._viewers.pop(viewer_id, None)
            state = self._cameras.get(camera)
            if state is not None:
                state.viewers.discard(viewer_id)
                if not state.viewers:
                    del self._cameras[camera]  # nobody watches: no frame is kept, none encoded

    def viewers(self) -> dict[str, int]:
        with self._lock:
            return {name: len(state.viewers) for name, state in self._cameras.items()}

    # ----- the feed's thread

    def start(self) -> None:
        self._thread.start(timeout=10)

    def stop(self) -> None:
        self._thread.stopping.set()
        self._wake.set()
        self._thread.stop(5)

    def _serve(self, thread: ServiceThread) -> None:
        thread.ready()
        while not thread.stopping.is_set():
            self._wake.wait(self.period)
            self._wake.clear()
            now = time.monotonic()
            soonest = self.period
            with self._lock:
                due = []
                for name, state in self._cameras.items():
                    wait = state.encoded_at + self.period * 0.75 - now  # a camera at live_fps jitters: all of it
                    if state.frame is not None and wait <= 0:
                        due.append((name, state, state.frame, [self._viewers[i] for i in state.viewers]))
                        state.frame = None
                    elif state.frame is not None:
                        soonest = min(soonest, wait)
            for _name, state, frame, viewers in due:
                state.encoded_at = now
                message = self.encode(frame)
                if message is None:
                    continue
                state.encoded += 1
                self.encoded += 1
                for viewer in viewers:
                    viewer(message)
            if not due and soonest < self.period:
                time.sleep(max(0.0, soonest))

    def encode(self, frame: Frame) -> bytes | None:
        """The message of one frame (see the module), or None if it cannot be encoded."""
        image = frame.image
        height, width = image.shape[:2]
        scale = min(1.0, self.max_side / max(width, height))
        if scale < 1.0:
            image = cv2.resize(image, (max(1, round(width * scale)), max(1, round(height * scale))),
                               interpolation=cv2.INTER_AREA)  # fmt: skip
        ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, self.quality])
        if not ok:
            log.warning("camera %s: frame %d could not be encoded for the console", frame.camera, frame.index)
            return None
        detections = frame.detections
        names = np.array([*detections.class_names, ""], dtype=object)
        class_id = np.where((detections.class_id >= 0) & (detections.class_id < len(detections.class_names)),
                            detections.class_id, len(detections.class_names))  # fmt: skip
        boxes = [
            [*xyxy, track, label, confidence]
            for xyxy, track, label, confidence in zip(
                np.round(detections.xyxy.astype(np.float64), 1).tolist(), detections.tracker_id.tolist(), names[class_id].tolist(),
                np.round(detections.confidence.astype(np.float64), 3).tolist(), strict=True)
        ]
        header = json.dumps({"camera": frame.camera, "frame": frame.index, "ts": frame.ts_wall, "width": width,
                             "height": height, "scale": scale, "boxes": boxes}, separators=(",", ":")).encode()  # fmt: skip
        return struct.pack(">I", len(header)) + header + jpeg.tobytes()

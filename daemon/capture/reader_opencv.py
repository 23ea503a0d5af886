"""The OpenCV capture back end (FFmpeg inside), for machines without GStreamer or by choice (`backend: opencv`).

OpenCV decodes and hands over every frame, so what GStreamer does in its pipeline is done here in Python:
pacing files to their frame rate, the `fps` limit and `resize`. FFmpeg's own open and read timeouts are set
to `stall_timeout`, so a silent source makes `read` fail instead of blocking forever. A network source is opened with
FFmpeg's protocol whitelist set to network protocols only, so an HLS playlist naming a `file://` segment, key or
variant cannot make FFmpeg read a local file.
"""

from __future__ import annotations

import os
import threading
import time

import cv2
import numpy as np

from vigild.capture.reader import EndOfStream, FrameReader, RawFrame, SourceError, SourceStalled, check_local_source
from vigild.config.settings import CameraConfig
from vigild.config.sources import SourceKind, SourceSpec, with_credentials

OPTIONS_VARIABLE = "OPENCV_FFMPEG_CAPTURE_OPTIONS"
NETWORK_PROTOCOLS = "http,https,tls,tcp,udp,rtp,srtp,crypto,httpproxy,data"
"""What FFmpeg may open for a network source, itself and everything it names (HLS segments, keys, variants; RTP
sockets): no `file`, `fd`, `pipe`, `subfile` or any other protocol that reads this machine. `crypto` only wraps one
of the others; `data` is inline content."""
OPENCV_DEFAULT_OPTIONS = "rtsp_flags;prefer_tcp"
"""What OpenCV sets when the variable is unset (and drops when it is set): RTSP over TCP first."""
_FFMPEG_OPEN = threading.Lock()
"""OpenCV reads the options from the environment (process-wide) as it opens; every FFmpeg open holds this lock, so a
file camera never sees a network camera's options. OpenCV serialises its FFmpeg opens anyway (unless
OPENCV_FFMPEG_IS_THREAD_SAFE=1), so the lock makes no camera wait longer than it did."""


def network_options(current: str | None) -> str:
    """The options for a network source: the user's own `OPENCV_FFMPEG_CAPTURE_OPTIONS` (`key;value|key;value`, as
    OpenCV parses it; OpenCV's default when unset) with their `protocol_whitelist`, if any, replaced by ours."""
    pairs = (current if current is not None else OPENCV_DEFAULT_OPTIONS).split("|")
    kept = [pair for pair in pairs if pair and pair.split(";", 1)[0].strip() != "protocol_whitelist"]
    return "|".join([*kept, f"protocol_whitelist;{NETWORK_PROTOCOLS}"])


def open_ffmpeg(uri: str, params: list[int], *, network: bool) -> cv2.VideoCapture:
    """`cv2.VideoCapture(uri, CAP_FFMPEG, params)`, with network-only protocols when `network`; the environment is
    as it was once it returns."""
    with _FFMPEG_OPEN:
        if not network:
            return cv2.VideoCapture(uri, cv2.CAP_FFMPEG, params)
        before = os.environ.get(OPTIONS_VARIABLE)
        os.environ[OPTIONS_VARIABLE] = network_options(before)
        try:
            return cv2.VideoCapture(uri, cv2.CAP_FFMPEG, params)
        finally:
            if before is None:
                del os.environ[OPTIONS_VARIABLE]
            else:
                os.environ[OPTIONS_VARIABLE] = before


class OpenCVReader(FrameReader):
    backend = "opencv"

    def __init__(self, camera: str, config: CameraConfig, spec: SourceSpec, *, software_only: bool = False):
        super().__init__(camera, config, spec, software_only=software_only)
        self._capture: cv2.VideoCapture | None = None
        self._is_file = spec.kind is SourceKind.FILE
        self._min_interval = 1.0 / config.fps if config.fps else 0.0
        self._pending: RawFrame | None = None
        """A paced file frame read ahead of its time, delivered by a later `read`."""
        self._pass_started = 0.0
        self._read_in_pass = 0
        self._next_due = 0.0

    def open(self) -> None:
        check_local_source(self.spec)
        timeout_ms = int(self.config.stall_timeout * 1000)
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, timeout_ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, timeout_ms]
        if self.spec.kind is SourceKind.V4L2:
            self._capture = cv2.VideoCapture(self.spec.uri, cv2.CAP_V4L2)
        else:
            uri = self.spec.uri
            network = self.spec.kind in (SourceKind.RTSP, SourceKind.HTTP)
            if network:  # a file path has no place for credentials
                password = self.config.password.get_secret_value() if self.config.password else None
                uri = with_credentials(uri, self.config.username, password)
            self._capture = open_ffmpeg(uri, params, network=network)
        if not self._capture.isOpened():
            raise SourceError(f"OpenCV cannot open {self.spec.display}")
        fps = self._capture.get(cv2.CAP_PROP_FPS)
        self.source_fps = fps if fps and 0 < fps < 1000 else None
        self.decoder = "ffmpeg"
        self._pass_started = time.monotonic()

    def read(self, timeout: float) -> RawFrame | None:
        assert self._capture is not None, "open() first"
        deadline = time.monotonic() + timeout
        while True:
            frame = self._pending or self._decode_next()
            self._pending = None
            if frame is None:
                if time.monotonic() >= deadline:
                    return None
                continue
            if self._is_file and self.config.realtime and self.source_fps and frame.pts_ms is not None:
                delay = self._pass_started + frame.pts_ms / 1000.0 - time.monotonic()
                if delay > 0:
                    if time.monotonic() + delay > deadline:
                        self._pending = frame
                        time.sleep(max(0.0, deadline - time.monotonic()))
                        return None
                    time.sleep(delay)
                frame = RawFrame(frame.image, time.time(), time.monotonic(), frame.pts_ms)
            return self._resized(frame)

    def _decode_next(self) -> RawFrame | None:
        """The next frame within the `fps` limit; None when one was skipped by it."""
        assert self._capture is not None
        started = time.monotonic()
        ok, image = self._capture.read()
        if not ok or image is None:
            if self._is_file and self._read_in_pass > 0:
                raise EndOfStream()
            if not self._is_file and time.monotonic() - started >= 0.9 * self.config.stall_timeout:
                raise SourceStalled(f"no frame for {self.config.stall_timeout:g} s")
            self.counters.decode_errors += 1
            raise SourceError(f"no frame from {self.spec.display} (read failed)")
        ts_wall, ts_mono = time.time(), time.monotonic()
        self.counters.decoded += 1
        self._read_in_pass += 1
        pts_ms = self._capture.get(cv2.CAP_PROP_POS_MSEC) if self._is_file else None
        stream_time = pts_ms / 1000.0 if pts_ms is not None else ts_mono - self._pass_started
        if self._min_interval:
            if stream_time + 1e-6 < self._next_due:
                return None
            self._next_due = max(self._next_due + self._min_interval, stream_time)
        return RawFrame(image, ts_wall, ts_mono, pts_ms)

    def _resized(self, frame: RawFrame) -> RawFrame:
        if self.config.resize is None:
            return frame
        image = cv2.resize(frame.image, self.config.resize, interpolation=cv2.INTER_AREA)
        return RawFrame(np.ascontiguousarray(image), frame.ts_wall, frame.ts_mono, frame.pts_ms)

    def rewind(self) -> None:
        assert self._capture is not None
        self._capture.set(cv2.CAP_PROP_POS_FRAMES, 0)
        self._pass_started, self._read_in_pass, self._next_due = time.monotonic(), 0, 0.0
        self._pending = None

    def close(self) -> None:
        if self._capture is not None:
            self._capture.release()
            self._capture = None

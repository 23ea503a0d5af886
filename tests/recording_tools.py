"""What the recording tests share: the picture data of an MP4's video read independently of vigild (GStreamer's
command-line tools and a byte-level split of the Annex B stream), a camera recorded with real capture and the
daemon's real recording, fed events whose times the test chooses."""

from __future__ import annotations

import re
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2

from vigild.capture.camera import CameraCapture
from vigild.capture.clips import RecorderSettings
from vigild.capture.exchange import FrameExchange
from vigild.config.recording import CameraRecordingConfig, RecordingConfig
from vigild.config.settings import CameraConfig
from vigild.config.sources import parse_source
from vigild.events import Event
from vigild.frame import Frame
from vigild.outputs.bus import Stamped
from vigild.outputs.journal import Journal
from vigild.recording.manager import Recording

START_CODE = re.compile(b"\x00\x00\x01")


@dataclass(frozen=True)
class Picture:
    """One coded picture: its VCL NAL units, as bytes (framing, AUD, SPS and PPS left out)."""

    units: tuple[bytes, ...]
    key: bool


def pictures(mp4: Path, codec: str) -> list[Picture]:
    """The coded pictures of an MP4's video track in decode order, from `qtdemux ! <codec>parse` to an Annex B file
    (gst-launch: not vigild's code), split at start codes: each picture's VCL NAL units (H.264 types 1-5, H.265 types
    0-31), a new picture at each slice that is its picture's first."""
    stream = mp4.with_name(mp4.name + ".es")
    subprocess.run(
        ["gst-launch-1.0", "-q", "filesrc", f"location={mp4}", "!", "qtdemux", "!", f"{codec}parse", "!",
         f"video/x-{codec},stream-format=byte-stream,alignment=au", "!", "filesink", f"location={stream}"],
        check=True, timeout=120,
    )  # fmt: skip
    found: list[Picture] = []
    units: list[bytes] = []
    key = False
    for nal in START_CODE.split(stream.read_bytes())[1:]:
        nal = nal.rstrip(b"\x00")  # a 4-byte start code's first zero belongs to the next one
        if codec == "h264":
            kind, first = nal[0] & 0x1F, bool(nal[1] & 0x80)  # first_mb_in_slice == 0: ue(v) "1"
            vcl, idr = 1 <= kind <= 5, kind == 5
        else:
            kind, first = (nal[0] >> 1) & 0x3F, bool(nal[2] & 0x80)  # first_slice_segment_in_pic_flag
            vcl, idr = kind <= 31, 16 <= kind <= 21
        if not vcl:
            continue
        if first and units:
            found.append(Picture(tuple(units), key))
            units = []
        if first:
            key = idr
        units.append(nal)
    if units:
        found.append(Picture(tuple(units), key))
    stream.unlink()
    return found


def position_in(source: list[Picture], clip: list[Picture]) -> int:
    """Where the clip's pictures are, in order and whole, in the source's: the index of its first. AssertionError if
    they are not a run of the source's pictures."""
    assert clip, "the clip has no picture"
    starts = [i for i, picture in enumerate(source) if picture == clip[0]]
    assert starts, "the clip's first picture is not one of the source's (re-encoded?)"
    start = starts[0]
    assert source[start : start + len(clip)] == clip, "the clip's pictures are not a run of the source's"
    return start


def video_info(mp4: Path) -> dict[str, Any]:
    """Codec, size, frames and duration as OpenCV's FFmpeg reads the file (not vigild's code)."""
    capture = cv2.VideoCapture(str(mp4))
    assert capture.isOpened(), f"OpenCV cannot open {mp4}"
    fourcc = int(capture.get(cv2.CAP_PROP_FOURCC)).to_bytes(4, "little").decode(errors="replace")
    frames = 0
    while capture.grab():
        frames += 1
    info = {"fourcc": fourcc, "width": int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
            "height": int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)), "fps": capture.get(cv2.CAP_PROP_FPS),
            "frames": frames}  # fmt: skip
    capture.release()
    return info


@dataclass
class Recorded:
    published: list[Event] = field(default_factory=list)
    triggers: list[tuple[Stamped, Frame]] = field(default_factory=list)
    frames: int = 0
    frames_after_last_report: int = 0
    """Frames captured after the last clip was saved or dropped."""
    status: dict[str, Any] = field(default_factory=dict)
    """The recording's status (the heartbeat's `recording`) at the end."""

    def of_type(self, kind: str) -> list[Event]:
        return [e for e in self.published if e.type == kind]


def record_camera(tmp_path: Path, source: str, settings: CameraRecordingConfig, trigger_after_s: list[float],
                  *, until_saved: int = 1, timeout: float = 60.0, section: RecordingConfig | None = None,
                  camera: dict[str, Any] | None = None, linger_s: float = 0.0,
                  actions: dict[float, Any] | None = None) -> Recorded:  # fmt: skip
    """Camera `cam` on `source`, captured for real with its recorder, and the daemon's `Recording` on a real journal
    database: a `line.cross` of a person fed at the first frame `trigger_after_s[i]` seconds after the first one,
    until `until_saved` clips were saved or dropped (then `linger_s` more seconds), or `timeout`. `actions`: what to
    do (a callable) that many seconds after the first frame (on the test's thread, between frames)."""
    todo = sorted((actions or {}).items())
    started = None
    database = tmp_path / "journal.db"
    Journal(database).close()  # its tables
    root = section.path if section is not None and section.path is not None else tmp_path / "recordings"
    config = CameraConfig(source=source, **(camera or {}))
    exchange = FrameExchange()
    recorded = Recorded()
    holder: dict[str, CameraCapture] = {}
    recording = Recording(root, database, section, lambda name: settings if name == "cam" else None,
                          lambda: holder, recorded.published.append, "run-1")  # fmt: skip
    exchange.clip_listener = recording.report
    capture = CameraCapture("cam", config, parse_source(source), exchange,
                            recording=RecorderSettings(root, settings.pre_s, settings.encode_kbps,
                                                       settings.continuous.segment_s if settings.continuous else None))  # fmt: skip
    holder["cam"] = capture
    recording.start()
    capture.start()
    pending = sorted(trigger_after_s)
    first_ts = None
    seq = 0
    deadline = time.monotonic() + timeout
    reports, frames_at_report, finished = 0, 0, None
    try:
        while time.monotonic() < deadline:
            done = recorded.of_type("clip.saved") + recorded.of_type("clip.dropped")
            if len(done) != reports:
                reports, frames_at_report = len(done), recorded.frames
            if len(done) >= until_saved and not pending:
                finished = finished or time.monotonic()
                if time.monotonic() - finished >= linger_s:
                    break
            if todo and started is not None and time.monotonic() - started >= todo[0][0]:
                todo.pop(0)[1]()
            for frame in exchange.take(8, 0, 1, 0.1).frames:
                started = started or time.monotonic()
                recorded.frames += 1
                first_ts = frame.ts_wall if first_ts is None else first_ts
                if pending and frame.ts_wall - first_ts >= pending[0]:
                    pending.pop(0)
                    seq += 1
                    obj = {"track_id": seq, "label": "person", "class_id": 0, "confidence": 0.9, "bbox": [0, 0, 9, 9]}
                    event = Event("line.cross", "cam", frame.ts_wall, frame.index, obj,
                                  {"line": "door", "direction": "in"})  # fmt: skip
                    item = Stamped(seq, uuid.uuid4().hex, "run-1", event)
                    recorded.triggers.append((item, frame))
                    recording.feed(item)
    finally:
        capture.stop()
        exchange.close()
        capture.join(15)
        recording.stop()
    recorded.frames_after_last_report = recorded.frames - frames_at_report
    recorded.status = recording.status()
    return recorded


def audio_seconds(mp4: Path) -> float:
    """Seconds of audio in an MP4's first audio track (decoded by gst-launch to 8 kHz mono), 0 without one."""
    raw = mp4.with_name(mp4.name + ".pcm")
    done = subprocess.run(
        ["gst-launch-1.0", "-q", "filesrc", f"location={mp4}", "!", "qtdemux", "name=d", "d.audio_0", "!", "queue",
         "!", "aacparse", "!", "avdec_aac", "!", "audioconvert", "!", "audioresample", "!",
         "audio/x-raw,format=S16LE,channels=1,rate=8000", "!", "filesink", f"location={raw}"],
        capture_output=True, timeout=120,
    )  # fmt: skip
    seconds = raw.stat().st_size / 16000 if done.returncode == 0 and raw.exists() else 0.0
    raw.unlink(missing_ok=True)
    return seconds


def encode_with_audio(out: Path, audio: str, frames: int = 200) -> Path:
    """vtest.avi's first `frames` frames as H.264 (a keyframe every 10) with a tone as `audio` (`aac`: MP4, `opus`:
    Matroska, which MP4 does not take as it is)."""
    from conftest import VTEST

    encoder, mux = {"aac": ("avenc_aac ! aacparse", "mp4mux"), "opus": ("opusenc", "matroskamux")}[audio]
    subprocess.run(["gst-launch-1.0", "-q", *f"{mux} name=mux ! filesink location={out} filesrc location={VTEST} ! "
                    f"decodebin ! identity eos-after={frames} ! videoconvert ! x264enc speed-preset=ultrafast "
                    "key-int-max=10 bframes=0 ! h264parse ! mux. audiotestsrc wave=sine "
                    f"num-buffers={int(frames / 10 * 44100 / 1024)} ! audioconvert ! {encoder} ! mux.".split()],
                   check=True, timeout=300)  # fmt: skip
    return out

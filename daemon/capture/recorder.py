"""A camera's recorder (docs/recording.md): the last seconds of its encoded stream in memory, and the clips and
segments written from it as MP4, without decoding or encoding anything again.

The GStreamer reader hands every encoded access unit to `encoded` as it enters the decoder (a pad probe on the
decoder's sink pad: the camera's own H.264/H.265, parsed by decodebin), or, for sources that send raw video, as it
leaves the H.264 encoder of the recording branch. Packets hold references to GStreamer's buffers, not copies. The
ring keeps `pre_s` (plus a margin for events that arrive late) back to a keyframe.

A clip (`ClipOrder`) starts at the keyframe at or before its `start_ts` (the oldest buffered one when the camera
started later than that; the next one when none is buffered) and takes every packet up to `end_ts`. Each clip is
one `ClipWriter`: `appsrc ! h264parse ! mp4mux ! filesink`, GStreamer's own muxer on its own streaming thread, with
the timestamps rebased so the file starts at 0: a time `t` in the file is the wall-clock `start_ts + t`, as events'
`ts`. Files are fragmented MP4 (a fragment a second) written as `<name>.part` and renamed when the muxer has finished
them, so a killed run leaves a `.part` whose complete fragments are remuxed (`repair`) at the next start.

Wall-clock time of a packet: its PTS plus the offset the reader last measured between a decoded frame's PTS and
its capture time (`frame_time`), so packets and events share one clock.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vigild.capture.clips import ClipOrder, ClipReport, ClipState, RecorderSettings
from vigild.capture.gst_lockdown import kept_source, launch
from vigild.gstreamer import gst_modules
from vigild.lifecycle import ServiceThread

log = logging.getLogger("vigild.recording")

KEEP_SLACK_S = 5.0
"""Kept beyond `pre_s`: an event's order reaches the recorder after detection (and the hand-over from a worker)."""
RING_MAX_BYTES = 96 << 20
"""A stream without keyframes for long: the ring gives up its oldest packets beyond this."""
FINISH_TIMEOUT_S = 10.0
"""How long a finished clip's muxer may take to write its last fragment and index."""
PART = ".part"
SHALLOW = 0
"""Gst.BufferCopyFlags for a copy that shares the memory (set once GStreamer is loaded: `_shallow`)."""
CODECS = {"video/x-h264": ("h264", "h264parse"), "video/x-h265": ("h265", "h265parse")}
"""What MP4 keeps as it is, and the parser that frames it for the muxer."""
MUXER = "mp4mux fragment-duration=1000"
"""Fragmented (one fragment a second): a file cut off by a crash plays up to its last fragment once remuxed; a
finished one has its duration in the header, which browsers read."""


def inside(root: Path, relative: str) -> Path:
    """`root / relative`, or ValueError when it would leave `root` (absolute, `..`, a link out)."""
    target = (root / relative).resolve()
    if not target.is_relative_to(root.resolve()) or target == root.resolve():
        raise ValueError(f"{relative!r} is not a path below the recordings root")
    return target


@dataclass(slots=True)
class Packet:
    pts: int
    """ns, the stream's own timestamps (what the file's are rebased from)."""
    dts: int
    run: int
    """ns, running time: the clock shared with the decoded frames (what wall-clock times are mapped from)."""
    key: bool
    buffer: Any
    caps: Any
    size: int


def codec_of(caps: Any) -> tuple[str, str] | None:
    """(codec name, parser) of encoded video caps that MP4 keeps as they are; None for anything else."""
    return CODECS.get(caps.get_structure(0).get_name()) if caps is not None and caps.get_size() else None


def _size(caps: Any) -> tuple[int | None, int | None]:
    structure = caps.get_structure(0)
    ok_w, width = structure.get_int("width")
    ok_h, height = structure.get_int("height")
    return (width if ok_w else None), (height if ok_h else None)


def _shallow(gst: Any) -> Any:
    flags = gst.BufferCopyFlags
    return flags.FLAGS | flags.TIMESTAMPS | flags.META | flags.MEMORY


class ClipWriter:
    """One MP4 file from encoded packets; finished (`finish`) on a thread of its own, which reports the result."""

    def __init__(self, camera: str, clip_id: str, root: Path, relative: str, caps: Any,
                 report: Callable[[ClipReport], None], *, segment: bool = False, audio: Any = None):  # fmt: skip
        """`audio`: the caps of the camera's AAC, when it sends some: the file gets it as a second track."""
        global SHALLOW
        self._gst = gst_modules()[0]
        SHALLOW = _shallow(self._gst)
        self.camera, self.clip_id, self.relative, self.segment = camera, clip_id, relative, segment
        self._report = report
        codec = codec_of(caps)
        if codec is None:
            raise ValueError(f"cannot keep {caps.get_structure(0).get_name()} in MP4 as it is")
        self.codec, parser = codec
        self.width, self.height = _size(caps)
        self.final = inside(root, relative)
        self.part = self.final.with_name(self.final.name + PART)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.base: int | None = None
        self.first_wall: float | None = None
        self.last_wall: float | None = None
        self.last_pts = 0
        self.first_pts = 0
        self.frames = 0
        self.reason = ""
        self.failed: str | None = None
        self.done = threading.Event()
        location = '"' + str(self.part).replace("\\", "\\\\").replace('"', '\\"') + '"'
        audio_branch = " aacparse name=aparse ! mux." if audio is not None else ""
        self._pipeline = launch(f"{parser} name=parse ! {MUXER} name=mux ! filesink name=file location={location} "
                                f"sync=false async=false{audio_branch}")  # fmt: skip
        self._src = self._appsrc(caps, "parse")
        self._audio_src = self._appsrc(audio, "aparse") if audio is not None else None
        self.first_run: int | None = None
        """Running time of the first video packet: audio is placed against it."""
        self._bus = self._pipeline.get_bus()
        self._finishing = False
        if self._pipeline.set_state(self._gst.State.PLAYING) == self._gst.StateChangeReturn.FAILURE:
            self._teardown()
            raise OSError(f"cannot start writing {self.part}")
        self._thread = ServiceThread(f"clip-{camera}", self._watch)
        self._thread.start()

    def _appsrc(self, caps: Any, downstream: str) -> Any:
        src = kept_source("appsrc")
        if src is None:  # pragma: no cover: appsrc is in gst-plugins-base, which the daemon needs anyway
            raise ValueError("GStreamer's appsrc is not installed")
        src.set_property("caps", caps)
        src.set_property("format", self._gst.Format.TIME)
        src.set_property("max-bytes", 0)  # never blocks the camera's streaming thread: the muxer keeps up
        self._pipeline.add(src)
        src.link(self._pipeline.get_by_name(downstream))
        return src

    def push_audio(self, packet: Packet) -> None:
        """An AAC frame, placed by its running time against the first video frame's (dropped before it)."""
        if self._audio_src is None or self.failed is not None or self._finishing or self.first_run is None:
            return
        assert self.base is not None
        pts = packet.run - self.first_run + (self.first_pts - self.base)
        if pts < 0:
            return
        out = packet.buffer.copy_region(SHALLOW, 0, packet.size)
        out.pts = out.dts = pts
        self._audio_src.push_buffer(out)

    def push(self, packet: Packet, wall: float) -> None:
        if self.failed is not None or self._finishing:
            return
        gst = self._gst
        if self.base is None:
            self.base = min(packet.pts, packet.dts) if packet.dts != gst.CLOCK_TIME_NONE else packet.pts
            self.first_wall, self.first_pts, self.first_run = wall, packet.pts, packet.run
        if packet.pts < self.first_pts:  # shown before the first keyframe (an open GOP's leading pictures): they
            return  # refer to the GOP before, which the clip does not have
        pts = packet.pts - self.base
        # a new buffer sharing the same memory, whose timestamps are ours to set (PyGObject's `copy()` would hand
        # back the same buffer: the ring's, still in use)
        out = packet.buffer.copy_region(SHALLOW, 0, packet.size)
        out.pts = pts
        out.dts = packet.dts - self.base if packet.dts != gst.CLOCK_TIME_NONE and packet.dts >= self.base else pts
        self._src.push_buffer(out)
        self.frames += 1
        if packet.pts >= self.last_pts:
            self.last_pts, self.last_wall = packet.pts, wall

    @property
    def duration_s(self) -> float:
        """From the first frame's time to the last one's, plus one frame."""
        if self.frames == 0:
            return 0.0
        span = (self.last_pts - self.first_pts) / 1e9
        return span + (span / max(self.frames - 1, 1) if self.frames > 1 else 0.0)

    def finish(self, reason: str) -> None:
        """End the file (asynchronously: the writer's thread reports when it is saved)."""
        if self._finishing:
            return
        self._finishing, self.reason = True, reason
        self._src.end_of_stream()
        if self._audio_src is not None:
            self._audio_src.end_of_stream()

    def join(self, timeout: float) -> None:
        self.done.wait(timeout)

    def _watch(self, thread: ServiceThread) -> None:
        gst = self._gst
        thread.ready()
        deadline = None
        try:
            while True:
                message = self._bus.timed_pop_filtered(int(0.25e9), gst.MessageType.EOS | gst.MessageType.ERROR)
                if message is not None and message.type == gst.MessageType.ERROR:
                    error, debug = message.parse_error()
                    self.failed = _disk_full(error, debug) or f"{error.message}"
                    log.error("camera %s: writing %s failed: %s", self.camera, self.relative, self.failed)
                    break
                if message is not None:  # EOS: the muxer wrote its last fragment
                    break
                if self._finishing:
                    deadline = deadline or time.monotonic() + FINISH_TIMEOUT_S
                    if time.monotonic() > deadline:
                        self.failed = "the muxer did not finish the file"
                        break
        finally:
            self._teardown()
            self._conclude()
            self.done.set()

    def _teardown(self) -> None:
        self._pipeline.set_state(self._gst.State.NULL)
        self._bus.set_flushing(True)

    def _conclude(self) -> None:
        state, size, reason = ClipState.SAVED, 0, self.reason or "stopped"
        if self.failed is None and self.frames:
            try:
                # kept fragmented as written: browsers play it as it is, and a remux with the index first (to know the
                # duration before playing) measured about 4 % of a 2-core machine's detection at 16 busy cameras
                os.replace(self.part, self.final)
                size = self.final.stat().st_size
            except OSError as exc:
                self.failed = _disk_full_os(exc) or f"{exc.strerror or exc}"
        if self.failed is not None or not self.frames:
            state = ClipState.DROPPED
            reason = "disk_full" if self.failed == "disk_full" else ("error" if self.failed else self.reason)
            for path in (self.part, self.final):
                with contextlib.suppress(OSError):
                    path.unlink()
        # the last frame's wall-clock time plus one frame: where the next segment starts, even when the stream runs
        # slower or faster than the wall clock (a file read as fast as the chain goes)
        frame = self.duration_s - (self.last_pts - self.first_pts) / 1e9
        end = self.last_wall + frame if self.last_wall is not None else None
        self._report(ClipReport(
            self.clip_id, self.camera, state, self.relative, self.first_wall, end, self.frames, size, self.codec,
            self.width, self.height, reason, None if self.failed == "disk_full" else self.failed, self.segment,
        ))  # fmt: skip


def _disk_full_os(exc: OSError) -> str | None:
    return "disk_full" if exc.errno == errno.ENOSPC else None


def _disk_full(error: Any, debug: str | None) -> str | None:
    gst = gst_modules()[0]
    if error.matches(gst.ResourceError.quark(), gst.ResourceError.NO_SPACE_LEFT):
        return "disk_full"
    text = f"{error.message} {debug or ''}"
    return "disk_full" if os.strerror(errno.ENOSPC) in text or "No space left" in text else None


class _Clip:
    """An event clip being recorded: waiting for its first keyframe, then writing."""

    __slots__ = ("end_ts", "max_end", "order", "writer")

    def __init__(self, order: ClipOrder):
        self.order = order
        self.end_ts = order.end_ts
        self.max_end: float | None = None
        self.writer: ClipWriter | None = None


class CameraRecorder:
    """The encoded stream of one camera, its clips and its continuous segments. Thread-safe: packets come on a
    GStreamer streaming thread, frame times and ends of connections on the capture thread, orders on the daemon's
    (or a worker's message) thread; results go to `report` from the writers' threads."""

    def __init__(self, camera: str, settings: RecorderSettings, report: Callable[[ClipReport], None]):
        self._gst = gst_modules()[0]
        self.camera = camera
        self.settings = settings
        self._report = report
        self._lock = threading.Lock()
        self._ring: deque[Packet] = deque()
        self._keys: deque[Packet] = deque()
        """The ring's keyframes, oldest first (the ring starts at `_keys[0]` once it has one)."""
        self._ring_bytes = 0
        self._caps: Any = None
        self._offset: float | None = None
        self._clips: dict[str, _Clip] = {}
        self._segment: ClipWriter | None = None
        self._segment_started: float | None = None
        self._writers: list[ClipWriter] = []
        self._keep_s = settings.pre_s + KEEP_SLACK_S
        self._audio: deque[Packet] = deque()
        """AAC frames since the ring's oldest video packet (`Packet` with `key` true, `dts` unset)."""
        self._audio_caps: Any = None
        self._audio_logged = False
        self._concluded: deque[str] = deque(maxlen=1024)
        """Clips already ended here: a late order for one (a trigger the daemon saw in its window) changes nothing."""
        self.counters: Counter[str] = Counter()
        self._unsupported_logged = False

    # ----- from the reader

    def frame_time(self, running_ns: int, ts_wall: float) -> None:
        """A decoded frame: its running time and capture time (what maps packets to events' clock)."""
        self._offset = ts_wall - running_ns / 1e9

    def encoded(self, buffer: Any, caps: Any, running_ns: int) -> None:
        """One encoded access unit (on a streaming thread) at running time `running_ns`: into the ring and every
        clip being written."""
        gst = self._gst
        pts = buffer.pts if buffer.pts != gst.CLOCK_TIME_NONE else buffer.dts
        if caps is None:
            return
        packet = Packet(pts, buffer.dts, running_ns, not buffer.has_flags(gst.BufferFlags.DELTA_UNIT), buffer,
                        caps, buffer.get_size())  # fmt: skip
        with self._lock:
            if self._caps is None or not caps.is_equal(self._caps):
                self._new_format(caps)
            if self._offset is None:
                self._offset = time.time() - running_ns / 1e9
            if codec_of(caps) is None:
                return
            self._ring.append(packet)
            self._ring_bytes += packet.size
            self._trim()
            wall = self._wall(packet)
            for clip in list(self._clips.values()):
                self._live(clip, packet, wall)
            if self.settings.segment_s is not None:
                self._continuous(packet, wall)

    def audio(self, buffer: Any, caps: Any, running_ns: int) -> None:
        """One audio frame as it enters the audio decoder: kept (and written with the clips) when it is AAC, which
        MP4 holds as it is; any other audio is dropped (logged once)."""
        if caps is None:
            return
        structure = caps.get_structure(0)
        ok, version = structure.get_int("mpegversion")
        if structure.get_name() != "audio/mpeg" or not ok or version not in (2, 4):
            if not self._audio_logged:
                self._audio_logged = True
                log.info("camera %s: its audio (%s) is not recorded: MP4 keeps AAC as it is, nothing else",
                         self.camera, structure.get_name())  # fmt: skip
            return
        packet = Packet(buffer.pts, buffer.pts, running_ns, True, buffer, caps, buffer.get_size())
        with self._lock:
            if self._audio_caps is None or not caps.is_equal(self._audio_caps):
                self._audio_caps = caps
            self._audio.append(packet)
            oldest = self._ring[0].run if self._ring else running_ns
            while self._audio and self._audio[0].run < oldest - 1_000_000_000:  # a second of slack: never more
                self._audio.popleft()
            for clip in self._clips.values():
                if clip.writer is not None and self._wall(packet) <= clip.end_ts:
                    clip.writer.push_audio(packet)
            if self._segment is not None:
                self._segment.push_audio(packet)

    def discontinuity(self, reason: str) -> None:
        """The stream ended (the connection closed, a file went back to its start): every clip and the segment end
        here, cleanly; the ring starts again."""
        with self._lock:
            self._end_all(reason)
            self._ring.clear()
            self._keys.clear()
            self._ring_bytes = 0
            self._audio.clear()
            self._audio_caps = None
            self._caps = None
            self._offset = None

    # ----- from the daemon

    def order(self, order: ClipOrder) -> None:
        with self._lock:
            if order.clip_id in self._concluded:
                return
            clip = self._clips.get(order.clip_id)
            if clip is not None:  # a later trigger: the same clip, a later end (never past max_s)
                clip.end_ts = max(clip.end_ts, order.end_ts)
                if clip.max_end is not None:
                    clip.end_ts = min(clip.end_ts, clip.max_end)
                return
            clip = _Clip(order)
            try:
                inside(self.settings.root, order.path)
            except ValueError as exc:
                self._dropped(order, "error", str(exc))
                return
            self._clips[order.clip_id] = clip
            start = self._start_index(order.start_ts)
            if start is None:  # no keyframe buffered: the clip starts at the next one
                return
            packets = list(self._ring)[start:]
            self._begin(clip, packets[0])
            for packet in packets:
                if clip.writer is None or order.clip_id not in self._clips:
                    break
                self._live(clip, packet, self._wall(packet))
            if clip.writer is not None:  # the audio of the same stretch (the muxer interleaves by time)
                for sound in list(self._audio):
                    if self._wall(sound) <= clip.end_ts:
                        clip.writer.push_audio(sound)

    def close(self, timeout: float = FINISH_TIMEOUT_S) -> None:
        """The capture stops: finish everything and wait (up to `timeout`) for the files to be saved."""
        with self._lock:
            self._end_all("stopped")
            writers = list(self._writers)
        deadline = time.monotonic() + timeout
        for writer in writers:
            writer.join(max(0.0, deadline - time.monotonic()))

    # ----- inside (with the lock held)

    def _wall(self, packet: Packet) -> float:
        return packet.run / 1e9 + (self._offset or 0.0)

    def _trim(self) -> None:
        ring = self._ring
        if not ring:
            return
        keys = self._keys
        if ring[-1].key:
            keys.append(ring[-1])
        newest = ring[-1].run
        keep_ns = int(self._keep_s * 1e9)
        # drop the first GOP while the next keyframe is still older than what we keep (amortised: each packet goes
        # once, and only the keyframes are looked at)
        while len(keys) >= 2 and newest - keys[1].run >= keep_ns:
            keys.popleft()
            while ring[0] is not keys[0]:
                self._ring_bytes -= ring.popleft().size
        while self._ring_bytes > RING_MAX_BYTES and ring:  # no keyframe for long: what is left is undecodable
            if keys and ring[0] is keys[0]:
                keys.popleft()
            self._ring_bytes -= ring.popleft().size
            while ring and not (keys and ring[0] is keys[0]):
                self._ring_bytes -= ring.popleft().size

    def _start_index(self, start_ts: float) -> int | None:
        best = None
        for i, packet in enumerate(self._ring):
            if not packet.key:
                continue
            if best is None or self._wall(packet) <= start_ts:
                best = i
            if self._wall(packet) > start_ts:
                break
        return best

    def _begin(self, clip: _Clip, first: Packet) -> None:
        order = clip.order
        try:
            writer = ClipWriter(self.camera, order.clip_id, self.settings.root, order.path, first.caps,
                                self._finished, audio=self._audio_caps)  # fmt: skip
        except (OSError, ValueError) as exc:
            del self._clips[order.clip_id]
            reason = "disk_full" if isinstance(exc, OSError) and exc.errno == errno.ENOSPC else "error"
            self._dropped(order, reason, str(exc))
            return
        clip.writer = writer
        self._writers.append(writer)
        first_wall = self._wall(first)
        clip.max_end = first_wall + order.max_s
        clip.end_ts = min(clip.end_ts, clip.max_end)
        self._report(ClipReport(order.clip_id, self.camera, ClipState.WRITING, order.path, first_wall,
                                codec=writer.codec, width=writer.width, height=writer.height))  # fmt: skip

    def _live(self, clip: _Clip, packet: Packet, wall: float) -> None:
        if clip.writer is None:
            if wall > clip.end_ts:
                del self._clips[clip.order.clip_id]
                self._dropped(clip.order, "no_keyframe", f"no keyframe from {clip.order.start_ts:.3f} to its end")
            elif packet.key:
                self._begin(clip, packet)
                if clip.writer is not None:
                    clip.writer.push(packet, wall)
            return
        if wall > clip.end_ts:
            capped = clip.max_end is not None and clip.end_ts >= clip.max_end
            self._end(clip, "max_s" if capped else "done")
            return
        clip.writer.push(packet, wall)

    def _continuous(self, packet: Packet, wall: float) -> None:
        segment_s = self.settings.segment_s
        assert segment_s is not None
        if self._segment is not None and packet.key and wall - (self._segment_started or wall) >= segment_s:
            self._segment.finish("done")
            self._segment = None
        if self._segment is None:
            if not packet.key:
                return
            started = time.strftime("%Y-%m-%d/%H-%M-%S", time.gmtime(wall))
            relative = f"{self.camera}/continuous/{started}-{int(wall * 1000) % 1000:03d}.mp4"
            try:
                self._segment = ClipWriter(self.camera, f"segment-{self.camera}-{int(wall * 1000)}",
                                           self.settings.root, relative, packet.caps, self._finished, segment=True,
                                           audio=self._audio_caps)  # fmt: skip
            except (OSError, ValueError) as exc:
                self.counters["segment_errors"] += 1
                if self.counters["segment_errors"] == 1:
                    log.error("camera %s: cannot start a continuous segment: %s", self.camera, exc)
                return
            self._writers.append(self._segment)
            self._segment_started = wall
            self._report(ClipReport(self._segment.clip_id, self.camera, ClipState.WRITING, relative, wall,
                                    codec=self._segment.codec, width=self._segment.width,
                                    height=self._segment.height, segment=True))  # fmt: skip
        self._segment.push(packet, wall)

    def _new_format(self, caps: Any) -> None:
        if self._caps is not None:
            self._end_all("format_changed")
            self._ring.clear()
            self._keys.clear()
            self._ring_bytes = 0
        self._caps = caps
        if codec_of(caps) is None and not self._unsupported_logged:
            self._unsupported_logged = True
            log.warning("camera %s: recording keeps H.264 and H.265 as they are; this camera sends %s: no clips",
                        self.camera, caps.get_structure(0).get_name())  # fmt: skip

    def _end(self, clip: _Clip, reason: str) -> None:
        self._clips.pop(clip.order.clip_id, None)
        self._concluded.append(clip.order.clip_id)
        if clip.writer is not None:
            clip.writer.finish(reason)
        else:
            self._dropped(clip.order, "no_keyframe" if reason != "stopped" else reason,
                          "the stream ended before a keyframe came")

    def _end_all(self, reason: str) -> None:
        for clip in list(self._clips.values()):
            self._end(clip, reason)
        if self._segment is not None:
            self._segment.finish(reason)
            self._segment = None

    def _dropped(self, order: ClipOrder, reason: str, error: str) -> None:
        self._concluded.append(order.clip_id)
        self.counters[f"dropped_{reason}"] += 1
        self._report(ClipReport(order.clip_id, self.camera, ClipState.DROPPED, order.path, reason=reason,
                                error=error))  # fmt: skip

    def _finished(self, report: ClipReport) -> None:
        """A writer's thread: its file is saved or dropped."""
        with self._lock:
            self._writers = [w for w in self._writers if not w.done.is_set() and w.clip_id != report.clip_id]
        self.counters[report.state.value] += 1
        self._report(report)


def remux(source: Path, target: Path, check: bool = False) -> bool:
    """`source`'s tracks (a fragmented MP4, complete or cut off) remuxed into `target` with the index at the front,
    without decoding (`qtdemux`, a parser per track, `mp4mux faststart=true`); `source` removed on success. False
    (nothing written at `target`) when nothing in it could be read (`check`: or what was written has no frame)."""
    gst = gst_modules()[0]
    fixed = target.with_name(target.name + ".fix")
    location_out = '"' + str(fixed).replace("\\", "\\\\").replace('"', '\\"') + '"'
    ok = False
    try:
        pipeline = launch(f"qtdemux name=demux mp4mux name=mux faststart=true ! filesink location={location_out}")
        demux, mux = pipeline.get_by_name("demux"), pipeline.get_by_name("mux")

        def plug(_demux: Any, pad: Any) -> None:  # each track the file has: its parser, into the muxer
            caps = pad.get_current_caps() or pad.query_caps(None)
            name = caps.get_structure(0).get_name() if caps is not None and caps.get_size() else ""
            parser = {"video/x-h264": "h264parse", "video/x-h265": "h265parse", "audio/mpeg": "aacparse"}.get(name)
            if parser is None:
                return
            chain = gst.parse_bin_from_description(f"queue ! {parser}", True)
            pipeline.add(chain)
            chain.sync_state_with_parent()
            pad.link(chain.get_static_pad("sink"))
            chain.link(mux)

        demux.connect("pad-added", plug)
        src = kept_source("filesrc")
        if src is not None:
            src.set_property("location", str(source))
            pipeline.add(src)
            src.link(demux)
            pipeline.set_state(gst.State.PLAYING)
            message = pipeline.get_bus().timed_pop_filtered(int(60e9), gst.MessageType.EOS | gst.MessageType.ERROR)
            ok = message is not None and message.type == gst.MessageType.EOS
            pipeline.set_state(gst.State.NULL)
            ok = ok and fixed.exists() and (not check or _plays(fixed))
    except Exception as exc:  # GLib errors of a file that is not MP4 at all
        log.debug("remuxing %s: %s", source, exc)
        ok = False
    if ok:
        os.replace(fixed, target)
        source.unlink(missing_ok=True)
        return True
    with contextlib.suppress(OSError):
        fixed.unlink()
    return False


def repair(part: Path) -> Path | None:
    """A `.part` a killed run left: its complete fragments remuxed (no re-encode) into the final file, returned; None
    (and the part removed) when nothing in it plays."""
    final = part.with_name(part.name[: -len(PART)])
    if remux(part, final, check=True):
        return final
    with contextlib.suppress(OSError):
        part.unlink()
    return None


def probe_file(path: Path) -> dict[str, Any] | None:
    """Duration (s), frames, codec, width and height of an MP4's video, read by demuxing it; None if unreadable."""
    gst = gst_modules()[0]
    try:
        pipeline = launch("qtdemux name=demux demux.video_0 ! appsink name=sink sync=false emit-signals=false")
    except Exception:
        return None
    src = kept_source("filesrc")
    if src is None:
        return None
    src.set_property("location", str(path))
    pipeline.add(src)
    src.link(pipeline.get_by_name("demux"))
    sink = pipeline.get_by_name("sink")
    pipeline.set_state(gst.State.PLAYING)
    frames, first, last, caps = 0, None, None, None
    try:
        while True:
            sample = sink.try_pull_sample(int(5e9))
            if sample is None:
                break
            buffer = sample.get_buffer()
            caps = caps or sample.get_caps()
            frames += 1
            if buffer.pts != gst.CLOCK_TIME_NONE:
                first = buffer.pts if first is None else min(first, buffer.pts)
                end = buffer.pts + (buffer.duration if buffer.duration != gst.CLOCK_TIME_NONE else 0)
                last = end if last is None else max(last, end)
    finally:
        pipeline.set_state(gst.State.NULL)
    if not frames or caps is None:
        return None
    codec = codec_of(caps)
    width, height = _size(caps)
    return {"duration_s": ((last or 0) - (first or 0)) / 1e9, "frames": frames,
            "codec": codec[0] if codec else caps.get_structure(0).get_name(), "width": width, "height": height}


def _plays(path: Path) -> bool:
    info = probe_file(path)
    return info is not None and info["frames"] > 0


def export(camera: str, clip_id: str, root: Path, relative: str, segments: list[tuple[Path, float]],
           start_ts: float, end_ts: float) -> ClipReport:  # fmt: skip
    """A clip cut from continuous segments, without decoding: from the keyframe at or before `start_ts` to `end_ts`
    (wall clock), across segment files (`(file, wall-clock time of its first frame)`, oldest first), written as an
    event clip is. A change of format between segments ends the clip there. Synchronous: the report says how it
    went (`dropped`, `no_keyframe`, when the segments hold nothing of the window)."""
    gst = gst_modules()[0]
    results: list[ClipReport] = []
    writer: ClipWriter | None = None
    writer_caps: Any = None
    base_wall: float | None = None
    pending: list[tuple[Packet, float]] = []
    """Packets from the last keyframe before `start_ts`, waiting for the window to begin."""
    try:
        for file, first_wall in segments:
            ended = False
            for buffer, caps, pts0 in _demuxed(file):
                wall = first_wall + (buffer.pts - pts0) / 1e9
                key = not buffer.has_flags(gst.BufferFlags.DELTA_UNIT)
                if writer is not None and not caps.is_equal(writer_caps):
                    ended = True
                    break
                if base_wall is None:
                    base_wall = wall
                offset = int((wall - base_wall) * 1e9)
                dts = buffer.dts - buffer.pts + offset if buffer.dts != gst.CLOCK_TIME_NONE else gst.CLOCK_TIME_NONE
                packet = Packet(offset, dts, offset, key, buffer, caps, buffer.get_size())
                if wall > end_ts:
                    ended = True
                    break
                if writer is None:
                    if key:
                        pending = [(packet, wall)]
                    elif pending:
                        pending.append((packet, wall))
                    if wall < start_ts or not pending:
                        continue
                    writer = ClipWriter(camera, clip_id, root, relative, pending[0][0].caps, results.append)
                    writer_caps = pending[0][0].caps
                    for waiting, at in pending:
                        writer.push(waiting, at)
                    continue
                writer.push(packet, wall)
            if ended:
                break
    except (OSError, ValueError) as exc:
        if writer is None:
            reason = "disk_full" if isinstance(exc, OSError) and exc.errno == errno.ENOSPC else "error"
            return ClipReport(clip_id, camera, ClipState.DROPPED, relative, reason=reason, error=str(exc))
    if writer is None:
        return ClipReport(clip_id, camera, ClipState.DROPPED, relative, reason="no_keyframe",
                          error="the segments hold no keyframe of the clip's window")  # fmt: skip
    writer.finish("done")
    writer.join(FINISH_TIMEOUT_S * 2)
    return results[0] if results else ClipReport(clip_id, camera, ClipState.DROPPED, relative, reason="error",
                                                 error="the export did not finish")  # fmt: skip


def _demuxed(file: Path) -> Any:
    """`(buffer, caps, first pts)` of each video packet of an MP4, in decode order (qtdemux to an appsink)."""
    gst = gst_modules()[0]
    pipeline = launch("qtdemux name=demux demux.video_0 ! appsink name=sink sync=false max-buffers=64")
    src = kept_source("filesrc")
    if src is None:  # pragma: no cover
        return
    src.set_property("location", str(file))
    pipeline.add(src)
    src.link(pipeline.get_by_name("demux"))
    sink = pipeline.get_by_name("sink")
    pipeline.set_state(gst.State.PLAYING)
    first = None
    try:
        while True:
            sample = sink.try_pull_sample(int(10e9))
            if sample is None:
                return
            buffer = sample.get_buffer()
            if buffer.pts == gst.CLOCK_TIME_NONE:
                continue
            first = buffer.pts if first is None else first
            yield buffer, sample.get_caps(), first
    finally:
        pipeline.set_state(gst.State.NULL)


def exported(root: Path, relative: str, camera: str, clip_id: str, segments: list[tuple[Path, float]],
             start_ts: float, end_ts: float) -> Path:  # fmt: skip
    """A reference clip's file (`relative` under `root`), exported from its segments the first time it is asked for;
    ValueError saying why when there is nothing to play."""
    target = inside(root, relative)
    if target.is_file():
        return target
    report = export(camera, clip_id, root, relative, segments, start_ts, end_ts)
    if report.state is not ClipState.SAVED:
        raise ValueError(f"the clip cannot be cut from its segments ({report.reason}: {report.error})")
    return target

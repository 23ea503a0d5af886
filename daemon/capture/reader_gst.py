"""The GStreamer capture back end: one pipeline per connection, frames pulled from its appsink.

No GLib main loop is needed: the capture thread pulls samples with a timeout and drains the pipeline's bus
between pulls, so errors, end of stream and decoder warnings are seen on the same thread that acts on them. Errors a
decoder reports only in the debug log reach the reader through vigild.capture.gst_decoder_log.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from vigild.capture.gst_decoder_log import decoder_error_log
from vigild.capture.gst_lockdown import launch
from vigild.capture.gst_pipeline import (
    DECODEBIN_NAME,
    LOCAL_SOURCE_REFUSED,
    RAW_SOURCES,
    RECORD_SINK_NAME,
    SINK_NAME,
    hardware_decoder_to_blame,
    is_hardware_decoder,
    names_local_uri,
    nvmm_converter,
    pipeline_description,
    pipeline_limits_fps,
    reads_local,
    unusable_decoders,
)
from vigild.capture.reader import EndOfStream, FrameReader, RawFrame, SourceError, check_local_source
from vigild.capture.recorder import CameraRecorder
from vigild.capture.yuv import I420Layout, i420_to_bgr
from vigild.config.settings import CameraConfig
from vigild.config.sources import SourceKind, SourceSpec
from vigild.gstreamer import gst_modules

log = logging.getLogger("vigild.capture")

NTP_TO_UNIX_S = 2_208_988_800
"""Seconds from the NTP epoch (1900) to the UNIX epoch (1970)."""
MAX_PLAUSIBLE_AGE_S = 60.0
"""A frame whose pipeline timestamp says it is older than this has a timestamp from another clock: use now."""
AUTOPLUG_TRY, AUTOPLUG_SKIP = 0, 2
"""GstAutoplugSelectResult values (the enum is not introspectable)."""


class GstReader(FrameReader):
    backend = "gstreamer"

    def __init__(self, camera: str, config: CameraConfig, spec: SourceSpec, *, software_only: bool = False,
                 recorder: CameraRecorder | None = None):  # fmt: skip
        super().__init__(camera, config, spec, software_only=software_only)
        self._gst, _, self._gst_video = gst_modules()
        self.recorder = recorder
        """Gets the encoded stream (the decoder's input, or the recording branch's H.264 for raw sources)."""
        self._record_probes: list[tuple[Any, int]] = []
        self._pipeline: Any = None
        self._sink: Any = None
        self._bus: Any = None
        self._probe: tuple[Any, int] | None = None
        self._caps: Any = None
        self._layout = I420Layout(0, 0, (0, 0, 0), (0, 0, 0))
        self._pulled = 0
        self._skipped = 0
        self._eos = False
        self._decoder_known = False
        self._element_added_id: int | None = None
        self._guard_local = spec.kind is not SourceKind.FILE
        """Only a configured file may read local files: anything else that plugs a local source is refused."""
        self._refused = False
        """A local source was plugged (and kept from starting): the connection fails with `LOCAL_SOURCE_REFUSED`."""
        self._logged_errors = 0
        """Errors the decoder logged (FFmpeg's concealment reports), counted by `DecoderErrorLog` on the decoder's
        own threads; folded into `counters.decode_errors` on the capture thread."""
        self._logged_errors_seen = 0
        fps = config.fps
        in_reader = fps is not None and (not pipeline_limits_fps(fps) or spec.kind is SourceKind.HTTP)
        self._fps_interval_ns = int(1e9 / fps) if fps is not None and in_reader else 0
        """A limit videorate cannot apply (below 1 or fractional; MJPEG over HTTP, whose frames carry no
        timestamps): frames are skipped here instead, by timestamp or arrival time, before any copy."""
        self._next_due_ns = 0
        self._sink_drops = not (spec.kind is SourceKind.FILE and not config.realtime)
        """Files read as fast as possible block in the sink instead of dropping."""
        self._opened_ns = time.monotonic_ns()
        self._ntp_caps = self._gst.Caps.from_string("timestamp/x-ntp")

    def open(self) -> None:
        gst = self._gst
        is_file = self.spec.kind is SourceKind.FILE

        def registry_has(name: str) -> bool:
            return gst.ElementFactory.find(name) is not None

        skipped = unusable_decoders(registry_has)
        description = pipeline_description(
            self.spec,
            resize=self.config.resize,
            fps=None if self._fps_interval_ns else self.config.fps,
            # HLS arrives in segment-sized bursts: play it at its own pace, like a file in real time
            sync=(is_file and self.config.realtime) or self.spec.uri.split("?")[0].endswith(".m3u8"),
            drop=self._sink_drops,
            converter=nvmm_converter(registry_has, self.software_only),
            encode_kbps=self.recorder.settings.encode_kbps if self.recorder is not None else None,
        )
        check_local_source(self.spec)
        decoder_error_log(gst).watch(self)
        try:  # with no local source left in GStreamer's registry (a configured file's filesrc is kept aside)
            self._pipeline = launch(description)
        except Exception as exc:  # GLib.Error: a missing element (plugin package not installed)
            raise SourceError(f"cannot build the GStreamer pipeline: {exc}") from None
        self._sink = self._pipeline.get_by_name(SINK_NAME)
        self._bus = self._pipeline.get_bus()
        decodebin = self._pipeline.get_by_name(DECODEBIN_NAME)
        if decodebin is not None:
            if decodebin.find_property("uri") is not None:
                decodebin.connect("source-setup", self._setup_source)
            if self.software_only:
                decodebin.connect("autoplug-select", _skip_hardware_decoders)
            elif skipped:  # an NVMM decoder without nvvidconv: its frames could never leave the GPU
                log.warning("camera %s: %s installed without nvvidconv; not using it", self.camera, ", ".join(skipped))
                decodebin.connect("autoplug-select", _skip_named_decoders, skipped)
        self._element_added_id = self._pipeline.connect("deep-element-added", self._element_added)
        pad = self._sink.get_static_pad("sink")
        self._probe = (pad, pad.add_probe(gst.PadProbeType.BUFFER, self._count_buffer))
        record_sink = self._pipeline.get_by_name(RECORD_SINK_NAME)
        if record_sink is not None:
            self._record_from(record_sink.get_static_pad("sink"))
        if self._pipeline.set_state(gst.State.PLAYING) == gst.StateChangeReturn.FAILURE:
            self._raise_bus_error(default="the pipeline refused to start")
        if self._refused:
            raise SourceError(LOCAL_SOURCE_REFUSED)

    def _setup_source(self, _bin: Any, source: Any) -> None:
        """Called by uridecodebin once it created rtspsrc or souphttpsrc, before it connects."""
        gst = self._gst
        name = source.get_factory().get_name()
        username = self.config.username
        password = self.config.password.get_secret_value() if self.config.password else None
        if name == "rtspsrc":
            protocols = {"tcp": "tcp", "udp": "udp", "auto": "udp+udp-mcast+tcp"}[self.config.rtsp.transport]
            gst.util_set_object_arg(source, "protocols", protocols)
            source.set_property("latency", self.config.rtsp.latency_ms)
            # the stall watchdog decides when a silent server has failed; rtspsrc's own timeout only backs it up
            source.set_property("tcp-timeout", int((self.config.stall_timeout + 5) * 1_000_000))
            if source.find_property("add-reference-timestamp-meta") is not None:
                source.set_property("add-reference-timestamp-meta", True)  # NTP capture time from RTCP SR
        elif name == "souphttpsrc":
            source.set_property("timeout", int(self.config.stall_timeout) + 5)
            source.set_property("retries", 0)  # the capture thread owns retrying, with backoff
        if username and source.find_property("user-id") is not None:
            source.set_property("user-id", username)
            source.set_property("user-pw", password or "")

    def _element_added(self, _pipeline: Any, _bin: Any, element: Any) -> None:
        """Called (on a streaming thread) for every element plugged anywhere into the pipeline, as it is added to its
        bin: before its bin starts it, so a refused source never opens what it names."""
        factory = element.get_factory()
        if factory is None:
            return
        klass = factory.get_metadata("klass") or ""
        if is_hardware_decoder(factory.get_name(), klass):
            self.hardware_decoder = str(factory.get_name())
        if self.recorder is not None and self.spec.kind not in RAW_SOURCES and "Decoder" in klass:
            pad = element.get_static_pad("sink")
            if pad is not None and "Video" in klass:  # the camera's own encoded stream, parsed, entering the decoder
                self._record_from(pad)
            elif pad is not None and "Audio" in klass:  # its sound, as it enters the audio decoder
                self._record_probes.append((pad, pad.add_probe(self._gst.PadProbeType.BUFFER, self._record_audio)))
        if self._guard_local:
            uri, protocols = None, ()
            if isinstance(element, self._gst.URIHandler) and element.get_uri_type() == self._gst.URIType.SRC:
                uri, protocols = element.get_uri(), tuple(element.get_protocols() or ())
            if reads_local(klass, uri, protocols):
                self._refuse(element, uri or factory.get_name())

    def _refuse(self, element: Any, what: str) -> None:
        """Keep `element` in NULL (its bin's state changes skip a locked element, so it never opens its file) and
        fail the connection; the capture thread raises on its next read. The log names what was asked for, the
        camera's error does not."""
        element.set_locked_state(True)
        element.set_state(self._gst.State.NULL)
        self._refused = True
        log.warning("camera %s: its stream asked for %r, a local source: refused", self.camera, what)

    def _record_from(self, pad: Any) -> None:
        self._record_probes.append((pad, pad.add_probe(self._gst.PadProbeType.BUFFER, self._record_buffer)))

    def _record_buffer(self, pad: Any, info: Any) -> Any:
        recorder = self.recorder
        if recorder is not None:
            buffer = info.get_buffer()
            if buffer is not None:
                gst = self._gst
                pts = buffer.pts if buffer.pts != gst.CLOCK_TIME_NONE else buffer.dts
                segment = pad.get_sticky_event(gst.EventType.SEGMENT, 0)
                if pts != gst.CLOCK_TIME_NONE and segment is not None:
                    # running time: the same clock on every branch (an encoder shifts its PTS by 1000 hours)
                    running = segment.parse_segment().to_running_time(gst.Format.TIME, pts)
                    if running != gst.CLOCK_TIME_NONE:
                        recorder.encoded(buffer, pad.get_current_caps(), running)
        return self._gst.PadProbeReturn.OK

    def _record_audio(self, pad: Any, info: Any) -> Any:
        recorder = self.recorder
        buffer = info.get_buffer()
        gst = self._gst
        if recorder is not None and buffer is not None and buffer.pts != gst.CLOCK_TIME_NONE:
            segment = pad.get_sticky_event(gst.EventType.SEGMENT, 0)
            if segment is not None:
                running = segment.parse_segment().to_running_time(gst.Format.TIME, buffer.pts)
                if running != gst.CLOCK_TIME_NONE:
                    recorder.audio(buffer, pad.get_current_caps(), running)
        return gst.PadProbeReturn.OK

    def _count_buffer(self, _pad: Any, _info: Any) -> Any:
        self.counters.decoded += 1
        return self._gst.PadProbeReturn.OK

    def read(self, timeout: float) -> RawFrame | None:
        gst = self._gst
        if self._refused:
            raise SourceError(LOCAL_SOURCE_REFUSED)
        sample = self._sink.try_pull_sample(int(timeout * 1e9))
        self._drain_bus()
        self._fold_logged_errors()
        if self._refused:  # refused while waiting: what came meanwhile is from the network, but the camera fails
            raise SourceError(LOCAL_SOURCE_REFUSED)
        if sample is None:
            if self._eos or self._sink.is_eos():
                raise EndOfStream()
            return None
        self._pulled += 1
        buffer = sample.get_buffer()
        if buffer.has_flags(gst.BufferFlags.CORRUPTED):  # a decoder that marks what it concealed (VA-API, V4L2)
            self.counters.decode_errors += 1
        if self._fps_interval_ns:
            stream_ns = buffer.pts if buffer.pts != gst.CLOCK_TIME_NONE else time.monotonic_ns() - self._opened_ns
            if stream_ns < self._next_due_ns:
                self._skipped += 1
                return None
            self._next_due_ns = max(self._next_due_ns + self._fps_interval_ns, stream_ns)
        # one may be waiting in the sink; frames skipped by the fps limit are not drops; a blocking sink (files
        # with realtime: false) never drops, however many buffers are in flight between decoder and sink
        if self._sink_drops:
            self.counters.dropped = max(0, self.counters.decoded - self._pulled - 1 - self._skipped)
        caps = sample.get_caps()
        if self._caps is None or not caps.is_equal(self._caps):
            self._new_caps(caps)
        data = np.frombuffer(buffer.extract_dup(0, buffer.get_size()), dtype=np.uint8)
        image = i420_to_bgr(data, self._layout)
        pts = buffer.pts
        pts_ms = pts / 1e6 if pts != gst.CLOCK_TIME_NONE else None
        ts_wall, ts_mono = self._capture_time(sample, buffer)
        if self.recorder is not None and pts != gst.CLOCK_TIME_NONE:
            running = sample.get_segment().to_running_time(gst.Format.TIME, pts)
            if running != gst.CLOCK_TIME_NONE:
                self.recorder.frame_time(running, ts_wall)
        return RawFrame(image, ts_wall, ts_mono, pts_ms)

    def _new_caps(self, caps: Any) -> None:
        info = self._gst_video.VideoInfo.new_from_caps(caps)
        self._caps = caps
        self._layout = I420Layout(info.width, info.height, tuple(info.stride[:3]), tuple(info.offset[:3]))
        if info.fps_n > 0 and info.fps_d > 0:
            self.source_fps = info.fps_n / info.fps_d
        if not self._decoder_known:
            self.decoder, self._decoder_known = self._find_decoder(), True

    def _capture_time(self, sample: Any, buffer: Any) -> tuple[float, float]:
        """When the frame was captured, on the wall clock and the monotonic one (docs/capture.md, Timestamps)."""
        now_wall, now_mono = time.time(), time.monotonic()
        if self.spec.kind in (SourceKind.FILE, SourceKind.HTTP) or buffer.pts == self._gst.CLOCK_TIME_NONE:
            return now_wall, now_mono
        # live sources: the buffer's running time is when the source stamped it (camera driver, RTP arrival
        # corrected by the jitter buffer), on the pipeline clock; the difference to the clock's now is its age
        running = sample.get_segment().to_running_time(self._gst.Format.TIME, buffer.pts)
        clock = self._pipeline.get_clock()
        age = 0.0
        if clock is not None and running != self._gst.CLOCK_TIME_NONE:
            age = (clock.get_time() - self._pipeline.get_base_time() - running) / 1e9
            if not 0.0 <= age <= MAX_PLAUSIBLE_AGE_S:
                age = 0.0
        ts_wall = now_wall - age
        meta = buffer.get_reference_timestamp_meta(self._ntp_caps) if self.spec.kind is SourceKind.RTSP else None
        if meta is not None:  # the camera's own capture time, from its RTCP sender reports
            ts_wall = meta.timestamp / 1e9 - NTP_TO_UNIX_S
        return ts_wall, now_mono - age

    def _find_decoder(self) -> str | None:
        iterator = self._pipeline.iterate_recurse()
        while True:
            result, element = iterator.next()
            if result != self._gst.IteratorResult.OK:
                return None
            factory = element.get_factory()
            if factory is not None:
                klass = factory.get_metadata("klass") or ""
                if "Decoder" in klass and ("Video" in klass or "Image" in klass):
                    return str(factory.get_name())

    def _fold_logged_errors(self) -> None:
        logged = self._logged_errors
        if logged != self._logged_errors_seen:
            self.counters.decode_errors += logged - self._logged_errors_seen
            self._logged_errors_seen = logged

    def owns(self, element: Any) -> bool:
        """Whether `element` (any element, or a top-level pipeline) belongs to this reader's pipeline."""
        pipeline = self._pipeline
        if pipeline is None:
            return False
        while element.get_parent() is not None:
            element = element.get_parent()
        return bool(element == pipeline)

    def has_element_named(self, name: str) -> bool:
        pipeline = self._pipeline
        return pipeline is not None and pipeline.get_by_name(name) is not None

    def count_logged_error(self) -> None:
        self._logged_errors += 1

    def _drain_bus(self) -> None:
        gst = self._gst
        while True:
            message = self._bus.pop_filtered(gst.MessageType.ERROR | gst.MessageType.EOS | gst.MessageType.WARNING)
            if message is None:
                return
            if message.type == gst.MessageType.EOS:
                self._eos = True
            elif message.type == gst.MessageType.ERROR:
                self._raise_error(message)
            else:
                error, _debug = message.parse_warning()
                if _is_decoder(message.src):
                    self.counters.decode_errors += 1
                log.debug("camera %s: GStreamer warning from %s: %s", self.camera, message.src.get_name(), error)

    def _raise_bus_error(self, default: str) -> None:
        message = self._bus.pop_filtered(self._gst.MessageType.ERROR)
        if message is not None:
            self._raise_error(message)
        raise SourceError(default)

    def _raise_error(self, message: Any) -> None:
        if self._refused:  # whatever a demuxer says after its source was refused, the reason is the refusal
            raise SourceError(LOCAL_SOURCE_REFUSED)
        error, debug = message.parse_error()
        if self._guard_local and names_local_uri(f"{error.message} {debug}"):  # a demuxer failed to fetch one
            raise SourceError(LOCAL_SOURCE_REFUSED)
        source = message.src
        factory = source.get_factory() if hasattr(source, "get_factory") else None
        factory_name = factory.get_name() if factory is not None else ""
        if _is_decoder(source):
            self.counters.decode_errors += 1
        hardware_decoder = hardware_decoder_to_blame(
            _origin(source), self.hardware_decoder, error.domain, error.code, debug or ""
        )
        detail = _last_line(debug)
        if detail and error.message in detail:  # "Unauthorized" + "Unauthorized (401)": the detail says it all
            text = detail
        else:
            text = error.message + (f" ({detail})" if detail and detail not in error.message else "")
        raise SourceError(
            f"{factory_name or source.get_name()}: {text}",
            hardware_decoder=hardware_decoder,
        )

    def rewind(self) -> None:
        gst = self._gst
        self._eos = False
        self._next_due_ns = 0
        if self.recorder is not None:  # the file starts again: its timestamps go back to 0
            self.recorder.discontinuity("stream_ended")
        if not self._pipeline.seek_simple(gst.Format.TIME, gst.SeekFlags.FLUSH | gst.SeekFlags.KEY_UNIT, 0):
            raise SourceError("cannot seek back to the start of the file")

    def close(self) -> None:
        if self._pipeline is None:
            return
        self._fold_logged_errors()
        if self._probe is not None:
            pad, probe_id = self._probe
            pad.remove_probe(probe_id)
            self._probe = None
        for pad, probe_id in self._record_probes:
            pad.remove_probe(probe_id)
        self._record_probes.clear()
        self._pipeline.set_state(self._gst.State.NULL)
        if self.recorder is not None:  # clips end where the stream ended
            self.recorder.discontinuity("stream_ended")
        if self._element_added_id is not None:
            self._pipeline.disconnect(self._element_added_id)
            self._element_added_id = None
        self._bus.set_flushing(True)  # drop pending messages (they hold references to elements)
        self._pipeline = self._sink = self._bus = self._caps = None


def _skip_hardware_decoders(_bin: Any, _pad: Any, _caps: Any, factory: Any) -> int:
    hardware = is_hardware_decoder(factory.get_name(), factory.get_metadata("klass") or "")
    return AUTOPLUG_SKIP if hardware else AUTOPLUG_TRY


def _skip_named_decoders(_bin: Any, _pad: Any, _caps: Any, factory: Any, names: tuple[str, ...]) -> int:
    return AUTOPLUG_SKIP if factory.get_name() in names else AUTOPLUG_TRY


def _origin(element: Any) -> list[tuple[str, str]]:
    """`(factory name, element class)` of `element` and of each bin around it, innermost first."""
    origin = []
    while element is not None:
        factory = element.get_factory() if hasattr(element, "get_factory") else None
        if factory is not None:
            origin.append((str(factory.get_name()), str(factory.get_metadata("klass") or "")))
        element = element.get_parent()
    return origin


def _is_decoder(element: Any) -> bool:
    factory = element.get_factory() if hasattr(element, "get_factory") else None
    return factory is not None and "Decoder" in (factory.get_metadata("klass") or "")


def _last_line(debug: str | None) -> str:
    """GStreamer's debug string ends with the useful part ('Unauthorized', 'Could not connect...')."""
    if not debug:
        return ""
    return debug.strip().splitlines()[-1].strip()

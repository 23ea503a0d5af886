"""GStreamer pipeline descriptions for each kind of source (GStreamer itself is loaded by vigild.gstreamer).

Kept apart from the reader so the pipelines can be read (and tested) as text. Every pipeline ends the same way:
scale and rate-limit while still in YUV (cheaper than after conversion), settle on I420 (a no-op for most
decoders; vigild.capture.yuv converts to BGR faster than videoconvert would), and hand frames to an appsink that keeps
only the newest one (`max-buffers=1 drop=true`), so a slow chain drops frames instead of
building latency. Files read "as fast as possible" are the exception: their appsink blocks instead of dropping.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from fractions import Fraction

from vigild.config.sources import SourceKind, SourceSpec
from vigild.gstreamer import HARDWARE_DECODERS

NVMM_DECODERS = ("nvv4l2decoder",)
"""Jetson decoders whose only output is `video/x-raw(memory:NVMM)`, which `videoconvert` cannot take."""
NVMM_CONVERTER = "nvvidconv"
"""The Jetson element that copies NVMM frames into system memory (`video/x-raw`)."""

# GLib error domains and codes of GStreamer's errors (GstCoreError, GstStreamError: stable ABI values)
CORE_ERROR_DOMAIN = "gst-core-error-quark"
STREAM_ERROR_DOMAIN = "gst-stream-error-quark"
CORE_ERROR_NEGOTIATION = 7
STREAM_ERROR_FAILED = 1
STREAM_ERROR_DECODE = 7
FLOW_REASONS_AFTER_A_HARDWARE_DECODER = ("reason not-negotiated", "reason not-linked")
"""How a streaming error reads when frames in GPU or video-engine memory could not go on to the next element."""

SINK_NAME = "sink"
DECODEBIN_NAME = "decode"
RECORD_SINK_NAME = "record"
"""The end of the recording branch of a raw source (its H.264, for the recorder's probe)."""
RAW_SOURCES = (SourceKind.TEST, SourceKind.V4L2)
"""Sources that send raw video (a V4L2 camera's MJPEG is decoded first): recording encodes them."""

LOCAL_SOURCE_REFUSED = "source tried to open a local file: refused"
"""A network camera's `last_error` when its stream (an HLS or DASH playlist) names a local file or device: the same
text whatever the file is, whether it exists or not, so the error tells nothing about this machine's files."""
NETWORK_URI_SCHEMES = frozenset(
    {"http", "https", "rtsp", "rtsps", "rtspu", "rtspt", "rtsph", "rtspsu", "rtspst", "rtspsh", "udp", "rtp", "srtp"}
    | {"data"}  # inline content (`data:` keys in playlists): read from the stream itself, not from this machine
)
"""URI schemes a network camera's pipeline may open on its own (segments, sockets rtspsrc opens for RTP)."""


def is_hardware_decoder(factory_name: str, klass: str) -> bool:
    """A decoder factory that uses a GPU or a video engine: named in `HARDWARE_DECODERS`, or a decoder whose element
    class says `Hardware`."""
    return factory_name in HARDWARE_DECODERS or ("Decoder" in klass and "Hardware" in klass)


def hardware_decoder_to_blame(
    origin: Sequence[tuple[str, str]], selected: str | None, domain: str, code: int, debug: str
) -> str | None:
    """The hardware decoder a pipeline error is put down to, or None when the error is not a decoder's.

    `origin`: `(factory name, element class)` of the element that posted the error, then of each bin it sits in,
    innermost first (a decoder may post from an element inside it). `selected`: the hardware decoder decodebin
    plugged into this pipeline, if any. `domain`, `code`, `debug`: the error's GLib domain, code and debug text.

    Blamed: an error from a hardware decoder or from anything inside one; and, while a hardware decoder is in the
    pipeline, errors that only its output explains, whichever element posts them: caps negotiation failed, a
    decode error, or a streaming thread stopped by `not-negotiated`/`not-linked` (frames in NVMM or CUDA memory
    that the next element cannot take are reported by the demuxer or queue whose thread pushed them, not by the
    decoder). A network, file or authentication error is never blamed on the decoder, whatever is plugged in.
    """
    for factory_name, klass in origin:
        if is_hardware_decoder(factory_name, klass):
            return factory_name
    if selected is None:
        return None
    if domain == CORE_ERROR_DOMAIN and code == CORE_ERROR_NEGOTIATION:
        return selected
    if domain == STREAM_ERROR_DOMAIN and code == STREAM_ERROR_DECODE:
        return selected
    stopped_by_its_output = any(reason in debug for reason in FLOW_REASONS_AFTER_A_HARDWARE_DECODER)
    if domain == STREAM_ERROR_DOMAIN and code == STREAM_ERROR_FAILED and stopped_by_its_output:
        return selected
    return None


def reads_local(klass: str, uri: str | None, protocols: Sequence[str]) -> bool:
    """Whether an element plugged into a running pipeline would read something on this machine, not the network.

    `klass`: its factory's element class; `uri`: its URI when it is a URI source (None when it is not, or has none
    yet); `protocols`: the schemes it handles as a URI source (empty when it is not one). A local file source
    (`Source/File`: filesrc, fdsrc, giosrc, multifilesrc...), or a URI source for any scheme but the network ones
    (`file://`, `fd://`, `v4l2://`, `appsrc://`...), is local; so is a URI source without a URI that handles no
    network scheme."""
    parts = klass.split("/")
    if "Source" in parts and "File" in parts:
        return True
    if uri:
        return uri.partition(":")[0].lower() not in NETWORK_URI_SCHEMES
    if protocols:
        return not any(protocol.lower() in NETWORK_URI_SCHEMES for protocol in protocols)
    return False


_URI_SCHEME = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*)://")


def names_local_uri(text: str) -> bool:
    """Whether an error text names a URI of a local scheme: what an adaptive demuxer says when its stream named a
    `file://` variant, key or segment that it found no source for (`Failed to download 'file:///…'`)."""
    return any(scheme.lower() not in NETWORK_URI_SCHEMES for scheme in _URI_SCHEME.findall(text))


def nvmm_converter(registry_has: Callable[[str], bool], software_only: bool) -> str | None:
    """`nvvidconv` where decodebin may plug a decoder with NVMM-only output (Jetson's `nvv4l2decoder`) and
    `nvvidconv` is installed; None elsewhere or when decoding in software."""
    if software_only or not any(registry_has(name) for name in NVMM_DECODERS):
        return None
    return NVMM_CONVERTER if registry_has(NVMM_CONVERTER) else None


def unusable_decoders(registry_has: Callable[[str], bool]) -> tuple[str, ...]:
    """Hardware decoders installed whose output this machine cannot bring into system memory (an NVMM decoder
    without `nvvidconv`): decodebin must skip them, or the camera would fail to link on every connection."""
    if registry_has(NVMM_CONVERTER):
        return ()
    return tuple(name for name in NVMM_DECODERS if registry_has(name))


def _fraction(fps: float) -> str:
    value = Fraction(fps).limit_denominator(1001)
    return f"{value.numerator}/{value.denominator}"


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def source_description(spec: SourceSpec) -> tuple[str, str]:
    """The part of the pipeline that produces decoded raw video: `(head, branches)`, where the rest of the
    pipeline links to the end of `head` and `branches` are extra chains feeding into it (the test balls)."""
    if spec.kind is SourceKind.TEST:
        return _test_pattern(spec)
    if spec.kind is SourceKind.V4L2:
        return f"v4l2src device={_quote(spec.uri)} ! decodebin name={DECODEBIN_NAME}", ""
    if spec.kind is SourceKind.FILE:
        return f"filesrc location={_quote(spec.uri)} ! decodebin name={DECODEBIN_NAME}", ""
    # rtsp and http(s): uridecodebin builds rtspsrc / souphttpsrc (+ hlsdemux, multipartdemux) and the decoder;
    # the reader sets their properties (transport, latency, credentials) in `source-setup`
    return f"uridecodebin name={DECODEBIN_NAME} uri={_quote(spec.uri)}", ""


def _test_pattern(spec: SourceSpec) -> tuple[str, str]:
    test = spec.test
    caps = f"width={test.width},height={test.height},framerate={_fraction(test.fps)}"
    if test.pattern != "balls":
        return f"videotestsrc is-live=true pattern={test.pattern} ! video/x-raw,{caps}", ""
    # three balls of different sizes on different paths, drawn on transparent layers over a dark background
    layers = []
    for index, (motion, color, radius_scale) in enumerate(
        (("wavy", "0xffff4040", 1.0), ("sweep", "0xff40ff40", 0.7), ("hsweep", "0xff4040ff", 0.5))
    ):
        size = max(8, int(min(test.width, test.height) * 0.25 * radius_scale)) // 2 * 2
        layers.append(
            f"videotestsrc is-live=true pattern=ball motion={motion} foreground-color={color} "
            f"background-color=0x00000000 ! video/x-raw,format=BGRA,width={size},height={size},"
            f"framerate={_fraction(test.fps)} ! balls.sink_{index}"
        )
    placement = " ".join(
        f"sink_{i}::xpos={x} sink_{i}::ypos={y}"
        for i, (x, y) in enumerate(
            ((test.width // 8, test.height // 6), (test.width // 2, test.height // 3), (test.width // 3, test.height // 2))
        )
    )
    return f"compositor name=balls background=black {placement} ! video/x-raw,{caps}", " ".join(layers)


def pipeline_limits_fps(fps: float) -> bool:
    """videorate's `max-rate` is a whole number of frames per second; other limits are applied by the reader."""
    return fps >= 1 and float(fps).is_integer()


def pipeline_description(
    spec: SourceSpec,
    *,
    resize: tuple[int, int] | None,
    fps: float | None,
    sync: bool,
    drop: bool,
    converter: str | None = None,
    encode_kbps: int | None = None,
) -> str:
    """The whole pipeline. `sync`: play at the stream's own pace (files in real time, HLS); `drop`: keep only the
    newest frame in the appsink (everything but files read as fast as possible); `converter`: an element that
    brings a hardware decoder's frames into system memory (`nvvidconv`, see `nvmm_converter`), placed right after
    the decoder; test patterns have no decoder and take none. `encode_kbps`: recording is on for a raw source
    (`RAW_SOURCES`): a branch encodes H.264 for the recorder (never on what the chain sees)."""
    head, branches = source_description(spec)
    steps = [head]
    if converter is not None and spec.kind is not SourceKind.TEST:
        steps += [converter, "video/x-raw"]
    if encode_kbps is not None and spec.kind in RAW_SOURCES:
        branches = (branches + " " if branches else "") + recording_branch(spec, encode_kbps)
        steps += ["tee name=rawtee", "queue max-size-buffers=2 leaky=downstream"]
    if fps is not None and pipeline_limits_fps(fps):
        # drop-only + max-rate: never duplicates, works for sources without a fixed rate (MJPEG, many RTSP
        # cameras) and for a limit above the source's rate; placed first so dropped frames are never scaled
        steps.append(f"videorate drop-only=true max-rate={int(fps)}")
    if resize is not None:
        steps.append("videoscale")
    steps.append("videoconvert")
    caps = "video/x-raw,format=I420"
    if resize is not None:
        caps += f",width={resize[0]},height={resize[1]},pixel-aspect-ratio=1/1"
    steps.append(caps)
    steps.append(
        f"appsink name={SINK_NAME} max-buffers=1 drop={'true' if drop else 'false'} "
        f"sync={'true' if sync else 'false'} enable-last-sample=false"
    )
    return " ! ".join(steps) + (" " + branches if branches else "")


def recording_branch(spec: SourceSpec, kbps: int) -> str:
    """H.264 for the recorder from a raw source's frames, as browsers play it (constrained baseline: no B-frames),
    a keyframe every 2 s; its queue drops rather than slow the frames the chain sees."""
    fps = spec.test.fps if spec.kind is SourceKind.TEST else 30.0
    gop = max(1, round(2 * fps))
    return (
        "rawtee. ! queue max-size-buffers=30 leaky=downstream ! videoconvert ! video/x-raw,format=I420 ! "
        f"x264enc speed-preset=veryfast tune=zerolatency bitrate={kbps} key-int-max={gop} bframes=0 ! "
        "video/x-h264,profile=constrained-baseline ! h264parse ! "
        f"video/x-h264,stream-format=avc,alignment=au ! fakesink name={RECORD_SINK_NAME} sync=false async=false"
    )

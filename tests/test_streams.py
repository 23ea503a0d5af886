"""Capture from real network and synthetic sources on loopback: RTSP (H.264, H.265, credentials), HTTP MJPEG,
test patterns, and sources that hang, are missing or refuse us."""

from __future__ import annotations

import itertools
import time

import pytest
from conftest import VTEST
from streams import HlsServer, MjpegServer, RtspServer, SilentServer, frames_at_least, free_port, run_camera

from vigild.capture.camera import CameraState
from vigild.capture.exchange import NoticeKind
from vigild.config.loading import CameraConfig, ReconnectConfig

FAST_RETRY = ReconnectConfig(initial_delay=0.1, max_delay=0.5)


@pytest.mark.parametrize(
    ("mount", "backend", "decoder"),
    [
        ("/h264", "gstreamer", "avdec_h264"),
        ("/h265", "gstreamer", "avdec_h265"),
        ("/h264", "opencv", "ffmpeg"),
    ],
)
def test_rtsp_stream_delivers_frames_of_the_right_size(rtsp_server, mount, backend, decoder):
    config = CameraConfig(source=rtsp_server.url(mount), backend=backend)
    frames, notices, capture = run_camera(config, frames_at_least(15))
    assert len(frames) >= 15
    assert all(f.image.shape == (576, 768, 3) for f in frames)
    up = notices[0]
    assert up.kind is NoticeKind.UP and up.detail["width"] == 768 and up.detail["height"] == 576
    assert up.detail["backend"] == backend and up.detail["decoder"] == decoder
    assert capture.stats.decoder == decoder
    # a live stream: capture times are now-ish and rise with the frames
    assert all(abs(f.ts_wall - time.time()) < 10 for f in frames)
    assert all(b.ts_mono > a.ts_mono for a, b in itertools.pairwise(frames))


def test_rtsp_over_udp(rtsp_server):
    config = CameraConfig.model_validate({"source": rtsp_server.url("/h264"), "rtsp": {"transport": "udp"}})
    frames, *_ = run_camera(config, frames_at_least(10))
    assert len(frames) >= 10 and frames[0].image.shape == (576, 768, 3)


def test_rtsp_resize_and_fps_limit_happen_in_the_pipeline(rtsp_server):
    config = CameraConfig(source=rtsp_server.url("/h264"), resize=(320, 240), fps=5)
    frames, *_ = run_camera(config, frames_at_least(8))
    assert all(f.image.shape == (240, 320, 3) for f in frames)
    spacing = [(b.pts_ms or 0) - (a.pts_ms or 0) for a, b in itertools.pairwise(frames)]
    assert min(spacing) >= 150, spacing  # 5 of the stream's 10 fps: 200 ms apart


def test_rtsp_credentials_from_config(encoded_media):
    server = RtspServer({"/cam": encoded_media["h264"]}, auth="viewer:s3cret").start()
    try:
        config = CameraConfig(source=server.url("/cam"), username="viewer", password="s3cret")
        frames, *_ = run_camera(config, frames_at_least(5))
        assert len(frames) >= 5

        wrong = CameraConfig(source=server.url("/cam"), username="viewer", password="nope", reconnect=FAST_RETRY)
        frames, notices, capture = run_camera(wrong, lambda _f, _n, c: c.stats.reconnects >= 2, timeout=20)
        assert frames == []
        assert capture.stats.reconnects >= 2  # retried with backoff, like any unavailable source
        assert "unauthorized" in (capture.stats.last_error or "").lower(), capture.stats.last_error
        assert "nope" not in (capture.stats.last_error or "")
        assert [n.kind for n in notices] == [NoticeKind.DOWN]
    finally:
        server.kill()


@pytest.mark.parametrize(
    ("backend", "error"),
    [("gstreamer", "no frame for 1 s"), ("opencv", "OpenCV cannot open rtsp://")],  # FFmpeg's open timeout
)
def test_server_that_accepts_but_sends_nothing_is_stalled_and_retried(backend, error):
    silent = SilentServer()
    try:
        config = CameraConfig(
            source=f"rtsp://127.0.0.1:{silent.port}/cam", backend=backend, stall_timeout=1.0, reconnect=FAST_RETRY
        )
        started = time.monotonic()
        _, notices, capture = run_camera(config, lambda _f, _n, c: len(silent.accepted) >= 2, timeout=15)
        took = time.monotonic() - started
        assert len(silent.accepted) >= 2, "the camera was not retried after stalling"
        assert took < 1.0 + 0.6 + 2.0, f"the second connection came after {took:.1f} s"
        assert (capture.stats.last_error or "").startswith(error), capture.stats.last_error
        assert [n.detail["reason"] for n in notices] == ["unavailable"]
    finally:
        silent.close()


def test_http_mjpeg_stream():
    server = MjpegServer(VTEST)
    try:
        frames, notices, _ = run_camera(CameraConfig(source=server.url), frames_at_least(10))
        assert len(frames) >= 10 and frames[0].image.shape == (576, 768, 3)
        assert notices[0].detail["decoder"] == "jpegdec"
    finally:
        server.close()


def test_fps_limit_on_a_source_without_a_fixed_frame_rate():
    server = MjpegServer(VTEST)  # MJPEG over HTTP announces no frame rate (0/1)
    try:
        frames, *_ = run_camera(CameraConfig(source=server.url, fps=5), frames_at_least(8))
        assert len(frames) >= 8
        spacing = [b.ts_mono - a.ts_mono for a, b in itertools.pairwise(frames)]
        assert sum(spacing) / len(spacing) >= 0.15, spacing  # about 5 of the stream's 10 frames a second
    finally:
        server.close()


@pytest.mark.parametrize("backend", ["gstreamer", "opencv"])
def test_fps_limit_above_the_source_rate_passes_every_frame(backend):
    frames, *_ = run_camera(CameraConfig(source=str(VTEST), backend=backend, fps=15, realtime=False), frames_at_least(20))
    assert [round(f.pts_ms or 0) for f in frames[:20]] == [i * 100 for i in range(20)]


def test_http_hls_stream(encoded_media, tmp_path):
    server = HlsServer(encoded_media["h264"], tmp_path / "hls")
    try:
        frames, notices, _ = run_camera(CameraConfig(source=server.url), frames_at_least(10))
        assert len(frames) >= 10 and frames[0].image.shape == (576, 768, 3)
        assert notices[0].detail["decoder"] == "avdec_h264"
    finally:
        server.close()


@pytest.mark.parametrize(
    ("source", "shape"),
    [("test://", (480, 640, 3)), ("test://smpte?width=320&height=240&fps=30", (240, 320, 3))],
)
def test_test_pattern_source(source, shape):
    frames, notices, capture = run_camera(CameraConfig(source=source), frames_at_least(10))
    assert len(frames) >= 10 and frames[0].image.shape == shape
    assert capture.stats.state is CameraState.STOPPED and notices[0].kind is NoticeKind.UP
    if source == "test://":  # the balls move: consecutive frames differ
        assert (frames[0].image != frames[-1].image).any()


@pytest.mark.parametrize(
    ("source", "error"),
    [
        ("/dev/video97", "no such device: /dev/video97"),
        ("rtsp://127.0.0.1:{closed}/cam", "rtspsrc:"),
        ("http://127.0.0.1:{closed}/mjpeg", "souphttpsrc:"),
    ],
)
def test_unavailable_sources_are_retried_with_a_clear_error(source, error):
    config = CameraConfig(source=source.format(closed=free_port()), reconnect=FAST_RETRY)
    frames, notices, capture = run_camera(config, lambda _f, _n, c: c.stats.reconnects >= 2, timeout=20)
    assert frames == [] and capture.stats.reconnects >= 2
    assert error in (capture.stats.last_error or ""), capture.stats.last_error
    assert [(n.kind, n.detail["reason"]) for n in notices] == [(NoticeKind.DOWN, "unavailable")]

"""Capture threads on the real video: pacing, fast reading without loss, fps limit, resize, loop, drops, retry."""

from __future__ import annotations

import itertools
import time

import pytest
from conftest import VTEST

from vigild.capture.camera import CameraCapture, CameraState
from vigild.capture.exchange import FrameExchange, NoticeKind
from vigild.config.loading import CameraConfig, ReconnectConfig
from vigild.config.sources import parse_source

VTEST_FRAMES = 795
BACKENDS = ["gstreamer", "opencv"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def run_capture(config: CameraConfig, until: int, timeout: float = 60.0, consume_every: float = 0.0):
    """Start a camera, take frames until `until` were taken or it ended; returns (frames, notices, capture, exchange)."""
    exchange = FrameExchange()
    capture = CameraCapture("cam", config, parse_source(config.source), exchange)
    capture.start()
    frames, notices = [], []
    deadline = time.monotonic() + timeout
    try:
        while len(frames) < until and time.monotonic() < deadline:
            taken = exchange.take(8, 0, 1, 0.2)
            frames.extend(taken.frames)
            notices.extend(taken.opened + taken.closed)
            if any(n.kind is NoticeKind.ENDED for n in taken.closed):
                break
            if consume_every:
                time.sleep(consume_every)
    finally:
        capture.stop()
        exchange.close()
        capture.join(5)
    return frames, notices, capture, exchange


def test_fast_file_delivers_every_frame_in_order_then_ends(backend: str):
    frames, notices, capture, exchange = run_capture(CameraConfig(backend=backend, source=str(VTEST), realtime=False), until=10_000)
    assert [f.index for f in frames] == list(range(VTEST_FRAMES))
    assert exchange.drops["cam"] == 0
    assert [n.kind for n in notices] == [NoticeKind.UP, NoticeKind.ENDED]
    assert notices[0].detail["width"] == 768 and notices[0].detail["fps"] == 10.0
    assert notices[-1].frame_index == VTEST_FRAMES - 1
    assert capture.stats.state is CameraState.ENDED
    first = frames[0]
    assert first.camera == "cam" and first.image.shape == (576, 768, 3) and first.image.dtype.name == "uint8"
    assert abs(first.ts_wall - time.time()) < 120 and first.ts_mono <= frames[-1].ts_mono
    assert frames[10].pts_ms == 1000.0  # 10 fps: frame 10 is at 1 s in the stream


def test_realtime_file_is_paced_at_its_own_frame_rate(backend: str):
    started = time.monotonic()
    frames, *_ = run_capture(CameraConfig(backend=backend, source=str(VTEST)), until=16)
    took = time.monotonic() - started
    assert len(frames) == 16
    assert took >= 1.4, f"16 frames of a 10 fps file came in {took:.2f} s"
    assert frames[-1].ts_mono - frames[0].ts_mono >= 1.4  # 15 intervals of 0.1 s, never sooner


def test_fps_limit_skips_frames_by_stream_time(backend: str):
    frames, *_ = run_capture(CameraConfig(backend=backend, source=str(VTEST), realtime=False, fps=2.5), until=10)
    assert [f.pts_ms for f in frames] == pytest.approx([i * 400.0 for i in range(10)], abs=1.0)
    assert [f.index for f in frames] == list(range(10))  # indices count the frames the camera delivered


def test_resize_happens_before_the_chain(backend: str):
    frames, *_ = run_capture(CameraConfig(backend=backend, source=str(VTEST), realtime=False, resize=(320, 240)), until=3)
    assert all(f.image.shape == (240, 320, 3) and f.size == (320, 240) for f in frames)


def test_loop_goes_on_past_the_end_with_rising_indices(backend: str):
    frames, notices, *_ = run_capture(
        CameraConfig(backend=backend, source=str(VTEST), realtime=False, loop=True), until=VTEST_FRAMES + 20
    )
    assert [f.index for f in frames] == list(range(VTEST_FRAMES + 20))
    assert NoticeKind.ENDED not in [n.kind for n in notices]
    assert frames[VTEST_FRAMES].pts_ms == pytest.approx(0.0, abs=1.0)  # the second pass starts at the beginning


def test_slow_consumer_of_a_realtime_camera_gets_the_latest_frame_and_drops_are_counted(backend: str):
    frames, _, capture, exchange = run_capture(
        CameraConfig(backend=backend, source=str(VTEST)), until=4, consume_every=0.5
    )
    stream_times = [f.pts_ms or 0.0 for f in frames]
    assert len(frames) == 4 and min(b - a for a, b in itertools.pairwise(stream_times)) >= 300  # 10 fps, 0.5 s apart
    assert exchange.drops["cam"] + capture.stats.source_drops >= 6


def test_missing_source_is_retried_with_backoff_and_reported_once(backend: str):
    config = CameraConfig(backend=backend, source="/nonexistent/cam.mp4", reconnect=ReconnectConfig(initial_delay=0.05, max_delay=0.1))
    exchange = FrameExchange()
    capture = CameraCapture("cam", config, parse_source(config.source), exchange)
    capture.start()
    time.sleep(1.0)
    capture.stop()
    capture.join(5)
    taken = exchange.take(8, 0, 1, 0.1)
    assert capture.stats.reconnects >= 4
    assert capture.stats.last_error == "file not found: /nonexistent/cam.mp4"
    assert [(n.kind, n.detail["reason"]) for n in taken.closed] == [(NoticeKind.DOWN, "unavailable")]
    assert not capture.is_alive() and capture.stats.state is CameraState.STOPPED


@pytest.fixture(scope="module")
def size_change(tmp_path_factory: pytest.TempPathFactory):
    from streams import encode_size_change

    return encode_size_change(VTEST, tmp_path_factory.mktemp("sizes") / "sizes.h264", ((768, 576), (384, 288)), 30)


BIG, SMALL = (576, 768, 3), (288, 384, 3)


@pytest.mark.parametrize(
    ("backend", "resize", "shapes"),
    [
        ("gstreamer", None, (BIG, SMALL)),  # the new size, as it comes
        ("gstreamer", (320, 240), ((240, 320, 3), (240, 320, 3))),
        ("opencv", (320, 240), ((240, 320, 3), (240, 320, 3))),
        # OpenCV (FFmpeg) scales every frame to the size it opened with: no new size, but no gap either
        ("opencv", None, (BIG, BIG)),
    ],
)
def test_a_stream_whose_frame_size_changes_keeps_delivering(size_change, backend, resize, shapes):
    path, (first, second) = size_change
    config = CameraConfig(backend=backend, source=str(path), realtime=False, resize=resize)
    frames, notices, capture, _ = run_capture(config, until=10_000)
    assert [f.image.shape for f in frames] == [shapes[0]] * first + [shapes[1]] * second
    assert [f.index for f in frames] == list(range(first + second))
    assert [n.kind for n in notices] == [NoticeKind.UP, NoticeKind.ENDED]  # one connection, no error
    assert capture.stats.reconnects == 0 and capture.stats.decode_errors == 0 and capture.stats.last_error is None
    if backend == "gstreamer" and resize is None:  # both parts start at vtest's first frame: the same picture, halved
        import cv2

        before, after = frames[0].image, frames[first].image
        assert cv2.absdiff(cv2.resize(before, (384, 288), interpolation=cv2.INTER_AREA), after).mean() < 4  # another frame: 6-8


def test_the_detector_follows_a_camera_whose_frame_size_changes(size_change):
    """The same camera's frames before and after the change through the detector: boxes in each frame's own size.
    The first frame of each part is the same picture of vtest.avi, at 768x576 and at 384x288."""
    import numpy as np
    from test_detector import darknet

    path, (first, _) = size_change
    frames, *_ = run_capture(CameraConfig(source=str(path), realtime=False), until=10_000)
    assert frames[0].image.shape == BIG and frames[first].image.shape == SMALL
    detector = darknet()
    detector.process([frames[0]])
    detector.process([frames[first]])
    big, small = frames[0].detections, frames[first].detections
    assert len(big) >= 3 and abs(len(big) - len(small)) <= 1
    for frame, detections in ((frames[0], big), (frames[first], small)):
        height, width = frame.image.shape[:2]
        assert (detections.xyxy >= 0).all() and (detections.xyxy[:, [0, 2]] <= width).all()
        assert (detections.xyxy[:, [1, 3]] <= height).all()
    best_big = big.xyxy[np.argmax(big.confidence)]
    best_small = small.xyxy[np.argmax(small.confidence)]
    np.testing.assert_allclose(best_small * 2, best_big, atol=10)

"""The pipelined batcher (issue 18): the next batch's detection runs on the detector's own thread while the
scheduler finishes the batch before. Real detectors on vtest frames: started ahead or not, a batch's results are
the same; a failure after the detector costs only its batch's frames; events keep their order."""

from __future__ import annotations

import threading
import time
from typing import Literal

import cv2
import numpy as np
import pytest
import torch
from conftest import VTEST, yolo_fastest

from vigild.capture.exchange import FrameExchange, Notice, NoticeKind
from vigild.config.loading import CameraConfig, PluginSpec, PublisherConfig, SchedulerConfig
from vigild.frame import Frame
from vigild.outputs.bus import EventBus
from vigild.outputs.publisher import Publisher
from vigild.pipeline.chain import Chain
from vigild.pipeline.scheduler import Scheduler
from vigild.plugin import Plugin, PluginConfig
from vigild.plugins.detection.detector import Detector, DetectorConfig

CAMS = {name: CameraConfig(source=f"{name}.mp4") for name in "abcd"}


@pytest.fixture(scope="module")
def vtest_images() -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(VTEST))
    images = []
    for _ in range(12):
        ok, image = capture.read()
        assert ok
        images.append(image)
    capture.release()
    return images


def mixed_batch(images: list[np.ndarray], start: int) -> list[Frame]:
    """Four cameras, three sizes, one frame that cannot be a model input."""
    now = time.time()
    return [
        Frame("a", start, now, time.monotonic(), images[start]),
        Frame("b", start, now, time.monotonic(), cv2.resize(images[start + 1], (1280, 720))),
        Frame("c", start, now, time.monotonic(), images[start + 2][100:400, 50:600]),
        Frame("d", start, now, time.monotonic(), np.zeros((48, 64), np.uint8)),  # not BGR: fails alone
    ]


def detector_config(backend: str) -> DetectorConfig:
    if backend == "darknet":
        return yolo_fastest(0.3).model_copy(update={"publish": True})
    return DetectorConfig(weights="yolov8n.yaml", confidence=0.0001, input_size=320, publish=True)  # untrained: low scores


@pytest.mark.parametrize("backend", ["ultralytics", "darknet"])
def test_a_batch_started_ahead_gives_exactly_the_results_of_the_same_batch_run_in_the_chain(backend, vtest_images):
    config = detector_config(backend)
    torch.manual_seed(0)  # the untrained network's weights, the same every run
    chain = Chain((PluginSpec("detector", Detector, config, dict.fromkeys(CAMS, config)),), "cpu", CAMS)
    chain.start()
    ((detector, _),) = chain.stages[0].instances
    assert isinstance(detector, Detector)
    threads: list[str] = []
    detect = detector.backend.detect

    def noted(images):
        threads.append(threading.current_thread().name)
        return detect(images)

    detector.backend.detect = noted  # type: ignore[method-assign]
    try:
        plain = [mixed_batch(vtest_images, start) for start in (0, 4)]
        passed_plain = [chain.process(batch) for batch in plain]
        assert threads == [threading.current_thread().name] * 2
        # as the scheduler does: the second batch is started before the first is finished
        ahead = [mixed_batch(vtest_images, start) for start in (0, 4)]
        chain.prefetch(ahead[0])
        chain.prefetch(ahead[1])
        passed_ahead = [chain.process(batch) for batch in ahead]
        assert threads[2:] == ["forward-detector_0"] * 2, "each batch detected once, on the forward thread"
        for one_batch, other_batch, one_passed, other_passed in zip(plain, ahead, passed_plain, passed_ahead, strict=True):
            assert [f.camera for f in one_passed] == [f.camera for f in other_passed] == ["a", "b", "c"]
            for one, other in zip(one_batch[:3], other_batch[:3], strict=True):
                assert len(one.detections) > 0
                np.testing.assert_array_equal(one.detections.xyxy, other.detections.xyxy)
                np.testing.assert_array_equal(one.detections.confidence, other.detections.confidence)
                np.testing.assert_array_equal(one.detections.class_id, other.detections.class_id)
                assert [e.data for e in one.events] == [e.data for e in other.events]
        assert chain.stages[0].failures["d"] == 4  # twice a run, both ways
    finally:
        chain.stop()


class FailOnConfig(PluginConfig):
    type: Literal["fail_on"] = "fail_on"


class FailOnFrame(Plugin[FailOnConfig]):
    """After the detector: raises (a bug, not FrameErrors) on the batch that holds camera a's frame 3, so the whole
    batch fails; notes the batches it saw and whether each frame came with detections."""

    Config = FailOnConfig

    def start(self) -> None:
        self.batches: list[list[tuple[str, int]]] = []
        self.failed: list[tuple[str, int]] = []
        self.people: dict[tuple[str, int], int] = {}

    def process(self, frames: list[Frame]) -> None:
        batch = [(frame.camera, frame.index) for frame in frames]
        self.batches.append(batch)
        if ("a", 3) in batch:
            self.failed = batch
            raise RuntimeError("injected failure after the detector")
        for frame in frames:
            self.people[(frame.camera, frame.index)] = len(frame.detections)


def queued_events(publisher: Publisher) -> list[tuple[str, str, int | None]]:
    events = []
    while publisher._queue:
        event = publisher._queue.popleft().event  # as the bus stamped it
        events.append((event.type, event.camera, event.frame))
    return events


@pytest.mark.parametrize("pipeline", [True, False], ids=["pipelined", "not-pipelined"])
def test_a_failure_after_the_detector_costs_only_its_batch_and_events_keep_their_order(pipeline, vtest_images):
    """Two cameras, files of 6 vtest frames read as fast as the chain takes them, the real detector and a plugin
    after it that fails on one batch: only that batch's frames are lost; every other frame came through with the
    people on it; each camera's events are in frame order, its camera.down last."""
    cams = {name: CameraConfig(source=f"{name}.mp4") for name in "ab"}
    detector, fail = yolo_fastest(0.3).model_copy(update={"publish": True}), FailOnConfig()
    chain = Chain(
        (PluginSpec("detector", Detector, detector, dict.fromkeys(cams, detector)),
         PluginSpec("fail_on", FailOnFrame, fail, dict.fromkeys(cams, fail))),
        "cpu",
        cams,
    )  # fmt: skip
    chain.start()
    ((detector_plugin, _),) = chain.stages[0].instances
    threads: list[str] = []
    detect = detector_plugin.backend.detect

    def noted(images):
        threads.append(threading.current_thread().name)
        return detect(images)

    detector_plugin.backend.detect = noted
    exchange = FrameExchange()
    publisher = Publisher(PublisherConfig(endpoint="inproc://unused", queue_size=100_000))
    bus = EventBus()
    bus.attach(publisher)
    ended = threading.Event()
    scheduler = Scheduler(SchedulerConfig(pipeline=pipeline), exchange, chain, bus.publish, list(cams), ended)
    for name in cams:
        exchange.notify(Notice(name, NoticeKind.UP, time.time(), 0, {}))

    def capture(name: str) -> None:
        for index in range(6):
            image = vtest_images[index + (6 if name == "b" else 0)]
            assert exchange.put(Frame(name, index, time.time(), time.monotonic(), image), wait=True)
        exchange.notify(Notice(name, NoticeKind.ENDED, time.time(), 5, {"reason": "end_of_stream"}))

    captures = [threading.Thread(target=capture, args=(name,)) for name in cams]
    for thread in captures:
        thread.start()
    scheduler.start()
    try:
        assert ended.wait(120), "the scheduler did not tell that every camera has ended"
    finally:
        scheduler.stop(30)
        for thread in captures:
            thread.join(10)
        chain.stop()
    plugin = chain.stages[1].instances[0][0]
    assert isinstance(plugin, FailOnFrame)
    everything = {(name, index) for name in cams for index in range(6)}
    assert ("a", 3) in plugin.failed and sorted(f for batch in plugin.batches for f in batch) == sorted(everything)
    assert set(plugin.people) == everything - set(plugin.failed)
    assert all(count > 0 for count in plugin.people.values()), "every frame that came through has its people"
    assert sum(scheduler.processed.values()) == 12 - len(plugin.failed)
    assert len(threads) == scheduler.batches, "each batch detected once"
    if pipeline:  # the first batch at least was started ahead (the next ones when their frames were ready in time)
        assert threads[0] == "forward-detector_0"
    else:
        assert set(threads) == {"scheduler"}
    assert chain.stages[1].failures["a"] + chain.stages[1].failures["b"] == len(plugin.failed)
    events = [event for event in queued_events(publisher) if event[0] != "camera.up"]
    for name in cams:
        mine = [(kind, frame) for kind, camera, frame in events if camera == name]
        assert mine == [("detections", i) for i in range(6)] + [("camera.down", 5)]

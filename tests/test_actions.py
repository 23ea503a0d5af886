"""Action recognition: tubes, models, events, on motion that only a temporal model can tell apart."""

from __future__ import annotations

import gc
import threading
import time
import weakref

import numpy as np
import pytest
import torch
from action_scene import (
    CLIP_LEN,
    MARGIN,
    MEAN,
    SCENE,
    SCENE_FRAMES,
    SIZE,
    SPEED,
    STD,
    STRIDE,
    render,
    train,
    training_key,
)
from torchvision.ops import box_iou

from vigild.config.loading import CameraConfig, PluginSpec
from vigild.events import Event
from vigild.frame import Detections, EndedTracks, Frame, TrackLifetimes, Tracks
from vigild.plugin import PluginConfigError, PluginContext
from vigild.plugins.actions.action_recognizer import ActionRecognizer, ActionRecognizerConfig
from vigild.plugins.actions.video_models import TORCHVISION_VIDEO_MODELS

TRUE = {person: action for person, (action, _, _) in enumerate(SCENE)}
FLIPPED = {"walk_left": "walk_right", "walk_right": "walk_left", "stand": "stand", "bob": "bob"}


@pytest.fixture(scope="session")
def motion_model(request, tmp_path_factory):
    """The tiny motion model, trained once (deterministically: fixed steps and seeds) and kept in pytest's cache
    under a key of what it depends on, so that a rerun on the same checkout skips the training."""
    cache = getattr(request.config, "cache", None)
    if cache is None:  # -p no:cacheprovider
        return train(tmp_path_factory.mktemp("motion-model"))
    directory = cache.mkdir(f"motion-model-{training_key()}")
    model, labels = directory / "motion.ts", directory / "motion.labels"
    if not (model.is_file() and labels.is_file()):  # train() writes the labels file last
        model, labels = train(directory)
    return model, labels


def action_config(model, labels, **overrides) -> ActionRecognizerConfig:
    settings = dict(
        model=str(model), weights=None, labels=labels, clip_len=CLIP_LEN, size=SIZE, mean=MEAN, std=STD,
        stride=STRIDE, interval=4, margin=MARGIN, threshold=0.6, min_clips=2, top_k=2,
    )  # fmt: skip
    settings.update(overrides)
    return ActionRecognizerConfig(**settings)


def person_of(event_box, truth) -> int | None:
    """The rendered person whose true box overlaps the event's box most (IoU over 0.3)."""
    people = list(truth)
    iou = box_iou(torch.tensor([event_box]), torch.tensor([truth[p] for p in people], dtype=torch.float32))[0]
    best = int(iou.argmax())
    return people[best] if float(iou[best]) > 0.3 else None


def actions_by_person(events, truths) -> dict[int, set[str]]:
    found: dict[int, set[str]] = {}
    for event in events:
        if event.type == "action.start":
            person = person_of(event.object["bbox"], truths[event.frame])
            assert person is not None, f"an action.start on no one: {event}"
            found.setdefault(person, set()).add(event.data["action"])
    return found


def run_chain(motion_model, reverse: bool, placement: str = "chain") -> tuple[list[Event], list[dict]]:
    """The scene through the detector, ByteTrack and the recognizer (`placement`: `thread` or `process` classify
    beside the chain, its events published from its own thread, as the daemon's bus gets them)."""
    from conftest import yolo_fastest

    from vigild.pipeline.chain import Chain
    from vigild.plugins.detection.detector import Detector
    from vigild.plugins.tracking.bytetrack import ByteTrack, ByteTrackConfig

    detector, tracker = yolo_fastest(0.3), ByteTrackConfig(update_interval=1.0)
    actions = action_config(*motion_model, placement=placement)
    published: list[Event] = []
    chain = Chain(
        (
            PluginSpec("detector", Detector, detector, {"r": detector}),
            PluginSpec("bytetrack", ByteTrack, tracker, {"r": tracker}),
            PluginSpec("action_recognizer", ActionRecognizer, actions, {"r": actions}),
        ),
        "cpu",
        {"r": CameraConfig(source="rendered")},
        publish=published.append,
    )
    chain.start()
    images, truths = render(SCENE, SCENE_FRAMES, reverse=reverse)
    events: list[Event] = []
    for i, image in enumerate(images):
        frame = Frame("r", i, 1000.0 + i / 10, time.monotonic(), image)
        chain.process([frame])
        events.extend(frame.events)
    events.extend(chain.source_ended("r", 1000.0 + len(images) / 10, len(images) - 1))
    chain.stop()
    if placement != "chain":
        assert not any(e.type.startswith("action.") for e in events), "a branch's events are its own to publish"
        frames = [e.frame for e in published]
        assert frames == sorted(frames), "a branch publishes in frame order"
    return events + published, truths


@pytest.mark.e2e
@pytest.mark.parametrize("branch", [True, False], ids=["branch", "in-chain"])
@pytest.mark.capture_modes
def test_the_daemon_tells_each_subscriber_the_true_action_of_each_person_and_no_other(
    tmp_path, motion_model, endpoint, subscriber_factory, branch
):
    """As a user runs it: the rendered scene as a video file, `vigild run` with the real detector, ByteTrack and
    the action recognizer with the user's TorchScript model and labels file, a plain pyzmq subscriber in its own
    process; the recognizer as a branch (its default) and in the chain."""
    from conftest import daemon_env, vigild, write_video, yolo_fastest_yaml

    images, truths = render(SCENE, SCENE_FRAMES)
    video = tmp_path / "actions.avi"
    write_video(images, video, 10)
    model, labels = motion_model
    config = tmp_path / "vigild.yaml"
    config.write_text(
        f"""\
cameras:
  rendered:
    source: {video}
    realtime: false
plugins:
{yolo_fastest_yaml(0.3)}
  - type: bytetrack
  - type: action_recognizer
    model: {model}
    weights: null
    labels: {labels}
    clip_len: {CLIP_LEN}
    size: {SIZE}
    mean: {list(MEAN)}
    std: {list(STD)}
    stride: {STRIDE}
    interval: 4
    margin: {MARGIN}
    threshold: 0.6
    branch: {"true" if branch else "false"}
publisher:
  endpoint: {endpoint}
  await_subscribers: 1  # the test's subscriber sees the first events (no PUB/SUB slow joiner)
device: cpu
"""
    )
    subscriber = subscriber_factory(endpoint, idle_s=5)
    daemon = vigild("run", "--config", str(config), "--log-level", "WARNING", env=daemon_env())
    assert daemon.wait(180) == 0, "the daemon exits 0 when its only file has ended"
    events = [
        Event(m["event"]["type"], "rendered", m["event"]["ts"], m["event"]["frame"], m["event"].get("object"),
              {"action": m["event"].get("action")})
        for m in subscriber.finish() if m["event"]["type"] in ("action.start", "action.end")
    ]  # fmt: skip
    assert actions_by_person(events, truths) == {person: {a} for person, a in TRUE.items()}
    starts = sorted((e.object["track_id"], e.data["action"]) for e in events if e.type == "action.start")
    ends = sorted((e.object["track_id"], e.data["action"]) for e in events if e.type == "action.end")
    assert starts == ends, "every action.start gets one action.end"


@pytest.mark.e2e
@pytest.mark.parametrize("placement", ["chain", "thread", "process"])
def test_played_backwards_walking_left_becomes_walking_right(motion_model, placement):
    """Through the real detector and tracker, in-process, on the scene played backwards: the model says what the
    reversed motion is, so time order is kept from the capture to the clip; classified in the chain, beside it on a
    thread, and in a process of its own."""
    reverse = True
    events, truths = run_chain(motion_model, reverse, placement)
    found = actions_by_person(events, truths)
    expected = {person: {FLIPPED[a] if reverse else a} for person, a in TRUE.items()}
    assert found == expected
    starts = [e for e in events if e.type == "action.start"]
    ends = [e for e in events if e.type == "action.end"]
    assert sorted((e.object["track_id"], e.data["action"]) for e in starts) == sorted(
        (e.object["track_id"], e.data["action"]) for e in ends
    ), "every action.start gets one action.end"
    said = [(e.object["track_id"], e.data["action"], e.type) for e in events if e.type.startswith("action.")]
    for key in {(track, action) for track, action, _ in said}:
        kinds = [kind for track, action, kind in said if (track, action) == key]
        assert kinds == ["action.start", "action.end"] * (len(kinds) // 2), f"{key}: an end never before its start"
    updates = [e for e in events if e.type == "track.update" and "actions" in e.data]
    assert updates and all(len(e.data["actions"]) == 2 for e in updates)


def test_reversing_the_clip_flips_left_and_right(motion_model):
    """The same tubes, classified in order and reversed in time."""
    images, truths = render(SCENE[:2], 40)
    plugin = ActionRecognizer(action_config(*motion_model), PluginContext("cpu", {"r": CameraConfig(source="r")}))
    plugin.start()
    for i, (image, truth) in enumerate(zip(images, truths, strict=True)):
        boxes = np.array([truth[p] for p in (0, 1)], np.float32)
        detections = Detections.untracked(boxes, np.ones(2, np.float32), np.zeros(2, np.int32), ("person",))
        plugin.process([Frame("r", i, i / 10, i / 10, image, detections=detections.with_tracker_ids(np.array([1, 2])))])
    slots = plugin._cameras["r"].slots
    clips = plugin.pool.clips(slots)
    labels = plugin.video.labels
    forward = [labels[i] for i in plugin.classify(clips).argmax(1)]
    backward = [labels[i] for i in plugin.classify(clips.flip(2)).argmax(1)]
    assert forward == ["walk_left", "walk_right"]
    assert backward == ["walk_right", "walk_left"]


def tracked(ids: list[int]) -> Detections:
    boxes = np.array([[10 + 30 * i, 10, 30 + 30 * i, 60] for i in range(len(ids))], np.float32).reshape(-1, 4)
    d = Detections.untracked(boxes, np.ones(len(ids), np.float32), np.zeros(len(ids), np.int32), ("person",))
    return d.with_tracker_ids(np.array(ids, np.int64))


def tracks_ending(detections: Detections, ids: list[int]) -> Tracks:
    """A tracker's verdict on a frame: the tracks `ids` ended (seen last where `tracked` puts them)."""
    lifetime = TrackLifetimes(*(np.zeros(len(ids)) for _ in range(5)))
    none = np.zeros(0, np.int64)
    return Tracks(detections, none, none, np.zeros(0), EndedTracks(tracked(ids), "lost", lifetime), 0)


def test_tubes_are_freed_when_tracks_end_and_memory_stays_flat(motion_model):
    plugin = ActionRecognizer(
        action_config(*motion_model, max_tracks=40, stride=1), PluginContext("cpu", {"c": CameraConfig(source="c")})
    )
    plugin.start()
    storage = plugin.pool.frames.data_ptr()
    image = np.zeros((120, 400, 3), np.uint8)
    next_id, live = 1, []
    for i in range(300):  # tracks come and go: 300 frames, about 12 live at a time, 600+ tracks in all
        frame = Frame("c", i, i / 10, i / 10, image)
        if i % 10 == 0:
            ending, live = live[:6], live[6:]
            live += list(range(next_id, next_id + 6))
            next_id += 6
            frame.tracks = tracks_ending(tracked(live), ending)  # as a tracker says so
        frame.detections = tracked(live)
        plugin.process([frame])
        assert plugin.pool.in_use == len(live)
    assert plugin.pool.frames.data_ptr() == storage
    crowd = Frame("c", 301, 30.1, 30.1, image, detections=tracked(list(range(10_000, 10_050))))
    plugin.process([crowd])
    assert plugin.pool.in_use == 40 and plugin.tubes_refused == 50 - (40 - len(live))
    plugin.on_source_end("c", 31.0, 301)
    assert plugin.pool.in_use == 0


def following_camera(action: str, frames: int) -> list[np.ndarray]:
    """A camera that follows one person (as a PTZ camera locked on them): each view is the square around them,
    with MARGIN of context, so the plaza slides past behind them."""
    images, truths = render([(action, 1, (120.0, 190.0) if action == "walk_right" else (560.0, 190.0))], frames)
    views = []
    for image, truth in zip(images, truths, strict=True):
        x0, y0, x1, y1 = truth[0]
        side = round(max(x1 - x0, y1 - y0) * (1 + 2 * MARGIN))
        left, top = round((x0 + x1 - side) / 2), round((y0 + y1 - side) / 2)
        views.append(np.ascontiguousarray(image[top : top + side, left : left + side]))
    return views


@pytest.mark.parametrize("action", ["walk_right", "walk_left"])
def test_whole_frame_mode_classifies_the_camera_view(motion_model, action):
    """`mode: frame` on a camera following a walker: the camera's whole view is classified, with the walker's true
    direction, one action.start and its action.end when the camera stops (no track, so no object)."""
    plugin = ActionRecognizer(
        action_config(*motion_model, mode="frame", margin=0), PluginContext("cpu", {"c": CameraConfig(source="c")})
    )
    plugin.start()
    events: list[Event] = []
    for i, view in enumerate(following_camera(action, 60)):
        frame = Frame("c", i, i / 10, i / 10, view)
        plugin.process([frame])
        events += frame.events
    assert plugin.scores.clips_seen[plugin._cameras["c"].slots[0]] >= 3  # 20 samples: full at 8, then every 4
    events += plugin.on_source_end("c", 6.0, 59)
    assert [(e.type, e.data["action"], e.object) for e in events] == [
        ("action.start", action, None),
        ("action.end", action, None),
    ]
    assert events[1].data["reason"] == "source_end"


@pytest.mark.parametrize("name", TORCHVISION_VIDEO_MODELS)
def test_torchvision_architectures_load_from_a_local_state_dict_and_keep_the_label_order(name, tmp_path):
    from torchvision.models import get_model

    labels = ["wave", "jump", "sit", "fall", "run"]
    module = get_model(name, weights=None, num_classes=len(labels))
    head = [m for m in module.modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv3d)][-1]  # s3d: a conv
    with torch.no_grad():
        head.bias.zero_()
        head.bias[3] = 50.0  # "fall" must win, whatever the input
    torch.save(module.state_dict(), tmp_path / "model.pt")
    (tmp_path / "labels.txt").write_text("\n".join(labels))
    config = ActionRecognizerConfig(model=name, weights=str(tmp_path / "model.pt"), labels=tmp_path / "labels.txt",
                                    mode="frame", max_tracks=2)  # fmt: skip
    plugin = ActionRecognizer(config, PluginContext("cpu", {"c": CameraConfig(source="c")}))
    plugin.start()
    clips = torch.randint(
        0, 255, (2, 3, plugin.video.clip_len, plugin.video.size, plugin.video.size), dtype=torch.uint8
    )
    scores = plugin.classify(clips)
    assert scores.shape == (2, 5)
    assert [plugin.video.labels[i] for i in scores.argmax(1)] == ["fall", "fall"]


@pytest.mark.parametrize(
    ("overrides", "key", "fragment"),
    [
        ({"model": "r4d_50"}, "model", "unknown video model 'r4d_50'"),
        ({"model": "s3d", "weights": None, "clip_len": 8}, "clip_len", "at least 14 frames"),
        ({"model": "mvit_v2_s", "weights": None, "size": 112}, "size", "at least 224 pixels"),
        ({"model": "mvit_v2_s", "weights": None, "clip_len": 8}, "clip_len", "at least 16 frames"),
        (
            {"model": "r3d_18", "weights": None, "actions": ["moonwalking on mars"]},
            "actions",
            "no label 'moonwalking on mars'",
        ),
    ],
)
def test_bad_model_settings_are_config_errors(overrides, key, fragment):
    plugin = ActionRecognizer(ActionRecognizerConfig(**overrides), PluginContext("cpu", {}))
    with pytest.raises(PluginConfigError) as raised:
        plugin.start()
    assert raised.value.key == key and fragment in str(raised.value)


def test_a_checkpoint_whose_classes_do_not_match_the_labels_is_a_config_error(tmp_path):
    from torchvision.models import get_model

    torch.save(get_model("r3d_18", weights=None, num_classes=7).state_dict(), tmp_path / "model.pt")
    (tmp_path / "labels.txt").write_text("a\nb\nc\n")
    config = ActionRecognizerConfig(model="r3d_18", weights=str(tmp_path / "model.pt"), labels=tmp_path / "labels.txt")
    with pytest.raises(PluginConfigError) as raised:
        ActionRecognizer(config, PluginContext("cpu", {})).start()
    assert (
        raised.value.key == "labels" and "classifies 7 classes" in str(raised.value) and "lists 3" in str(raised.value)
    )


def truth_clips(images: list[np.ndarray], truths: list[dict], people: tuple[int, ...]) -> torch.Tensor:
    """(P, 3, T, S, S) uint8: these people's crops of these frames, cut frame by frame around their true boxes
    (all of a frame's boxes in one cut, as the plugin does: the same region, so the same float rounding)."""
    from vigild.plugins.actions.tubes import TubeCutter, square_boxes

    cutter = TubeCutter(SIZE, torch.device("cpu"))
    height, width = images[0].shape[:2]
    crops = [
        cutter(image, square_boxes(np.array([truth[p] for p in people], np.float32), MARGIN, width, height))
        for image, truth in zip(images, truths, strict=True)
    ]
    return torch.stack(crops, dim=2)


def true_scores(model_file, clips: torch.Tensor) -> np.ndarray:
    """The model's softmax on (K, 3, T, S, S) uint8 clips, normalised as the config says, outside vigild."""
    module = torch.jit.load(str(model_file))
    x = (clips.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1, 1)
    with torch.no_grad():
        return torch.softmax(module(x), dim=1).numpy()


class FakeFailingVideoModel(torch.nn.Module):
    """Stands for a video model that fails once (a device error, a batch it cannot take): the real model, raising
    on its `fail_on`-th call."""

    def __init__(self, model: torch.nn.Module, fail_on: int):
        super().__init__()
        self.model, self.fail_on, self.calls = model, fail_on, 0

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("injected failure of the video model")
        return self.model(clips)


def test_a_model_failure_mid_batch_fails_only_the_frames_with_clips_and_leaves_the_tubes_right(motion_model):
    """Through the chain, batches of 4 frames, two tracks, a crop per frame, clips of 8 classified every 4 crops
    (on frames 7, 11, ...). The model fails on its second call (frame 11): only frame 11 fails and is counted;
    the tubes hold each frame's crop once (no frame cut twice); the clip that was not classified is classified
    on the next frame (12), with the scores the model gives that frame's true clip."""
    from vigild.pipeline.chain import Chain

    model_file, labels = motion_model
    config = action_config(model_file, labels, stride=1, interval=4, smoothing=0.5, branch=False)  # in the chain
    chain = Chain(
        (PluginSpec("action_recognizer", ActionRecognizer, config, {"r": config}),),
        "cpu",
        {"r": CameraConfig(source="rendered")},
    )
    chain.start()
    stage = chain.stages[0]
    plugin = stage.instances[0][0]
    assert isinstance(plugin, ActionRecognizer)
    plugin.run.module = FakeFailingVideoModel(plugin.run.module, fail_on=2)
    images, truths = render(SCENE[:2], 16)

    def frames(start: int) -> list[Frame]:
        batch = []
        for i in range(start, start + 4):
            boxes = np.array([truths[i][p] for p in (0, 1)], np.float32)
            found = Detections.untracked(boxes, np.ones(2, np.float32), np.zeros(2, np.int32), ("person",))
            batch.append(Frame("r", i, i / 10, i / 10, images[i], detections=found.with_tracker_ids(np.array([1, 2]))))
        return batch

    for start in (0, 4):
        assert len(chain.process(frames(start))) == 4
    slots = plugin._cameras["r"].slots
    assert plugin.scores.clips_seen[slots].tolist() == [1, 1]  # classified on frame 7

    passed = chain.process(frames(8))
    assert [f.index for f in passed] == [8, 9, 10] and stage.failures["r"] == 1
    assert plugin.pool.written[slots].tolist() == [12, 12], "each frame is cut into the tubes once"
    assert torch.equal(plugin.pool.clips(slots), truth_clips(images[4:12], truths[4:12], (0, 1))), "frames 4..11"
    assert plugin.scores.clips_seen[slots].tolist() == [1, 1]

    chain.process(frames(12))
    assert plugin.scores.clips_seen[slots].tolist() == [2, 2], "the clip left over is classified on frame 12"
    first = true_scores(model_file, truth_clips(images[0:8], truths[0:8], (0, 1)))
    second = true_scores(model_file, truth_clips(images[5:13], truths[5:13], (0, 1)))
    np.testing.assert_allclose(plugin.scores.smoothed[slots], 0.5 * second + 0.5 * first, atol=1e-5)
    chain.stop()


def test_track_updates_carry_each_tracks_current_top_actions_and_no_frame_outlives_the_chain(motion_model):
    """Through the chain (ByteTrack, then the recognizer, batches of 2), on the scene's true boxes: every
    `track.update` of a track whose tube has been classified carries its current top 2 actions, best first, as the
    recognizer's scores stand after that batch; one not yet classified carries none; the last update of each person
    names its true action. The track events stand before the recognizer's action events of the same frame (the
    tracker ran first). Neither plugin keeps a frame's detections once the frame has gone."""
    from vigild.pipeline.chain import Chain
    from vigild.plugins.tracking.bytetrack import ByteTrack, ByteTrackConfig

    tracker, actions = ByteTrackConfig(update_interval=0.5), action_config(*motion_model, top_k=2, branch=False)
    chain = Chain(
        (PluginSpec("bytetrack", ByteTrack, tracker, {"r": tracker}),
         PluginSpec("action_recognizer", ActionRecognizer, actions, {"r": actions})),
        "cpu",
        {"r": CameraConfig(source="rendered")},
    )  # fmt: skip
    chain.start()
    plugin = chain.stages[1].instances[0][0]
    assert isinstance(plugin, ActionRecognizer)
    images, truths = render(SCENE, SCENE_FRAMES)
    last_top: dict[int, str] = {}
    updates: list[bool] = []  # per track.update: whether it carries actions

    def check(passed: Frame) -> None:
        kinds = [e.type for e in passed.events]
        assert kinds == sorted(kinds, key=lambda kind: not kind.startswith("track.")), kinds
        for event in (e for e in passed.events if e.type == "track.update"):
            slot = int(plugin._cameras["r"].slots_of(np.array([event.object["track_id"]]))[0])
            updates.append(slot >= 0 and plugin.scores.clips_seen[slot] > 0)
            if not updates[-1]:
                assert "actions" not in event.data
                continue
            top = np.argsort(-plugin.scores.smoothed[slot])[:2]
            expected = [{"action": plugin.video.labels[k], "score": round(float(plugin.scores.smoothed[slot, k]), 4)}
                        for k in top]  # fmt: skip
            assert list(event.data) == ["age_s", "actions"] and event.data["actions"] == expected
            last_top[person_of(event.object["bbox"], truths[passed.index])] = expected[0]["action"]

    def frame(i: int) -> Frame:
        boxes = np.array(list(truths[i].values()), np.float32)
        found = Detections.untracked(boxes, np.full(4, 0.9, np.float32), np.zeros(4, np.int32), ("person",))
        return Frame("r", i, 1000.0 + i / 10, 0.0, images[i], detections=found)

    gone = []  # every Detections a frame had, from the detector's to the last plugin's
    for start in range(0, SCENE_FRAMES, 2):
        batch = [frame(i) for i in range(start, min(start + 2, SCENE_FRAMES))]
        gone += [weakref.ref(f.detections) for f in batch]
        passed = chain.process(batch)
        assert len(passed) == len(batch)
        gone += [weakref.ref(f.detections) for f in passed] + [weakref.ref(f.tracks.detections) for f in passed]
        for f in passed:
            check(f)
    del batch, passed, f
    assert sum(updates) >= 20 and updates.count(False) >= 4
    assert last_top == TRUE
    gc.collect()
    assert [ref for ref in gone if ref() is not None] == []
    chain.stop()


def test_the_tube_of_a_track_that_vanishes_is_released_and_reused(motion_model):
    """A walker is tracked and walking right starts; then it leaves and its track vanishes without a track.end
    (the tracker lost it without saying). One tube only: a second walker who comes later must wait. Exactly when
    the first has been missing for more than 4 x clip_len x stride + 30 frames, its action ends (reason `lost`)
    and its tube goes to the second walker, whose walking left is then recognised from a clean tube. (A crop a
    frame, walkers at STRIDE x SPEED px a frame: the motion the model knows from a crop every STRIDE frames.)"""
    model_file, labels = motion_model
    config = action_config(model_file, labels, stride=1, max_tracks=1)
    patience = 4 * CLIP_LEN * 1 + 30
    plugin = ActionRecognizer(config, PluginContext("cpu", {"c": CameraConfig(source="c")}))
    plugin.start()
    vanished, comes = 30, 80  # the first walker is last seen on frame 29; the second comes on frame 80
    released = vanished + patience + 1
    first, first_truth = render([("walk_right", 1, (60.0, 190.0))], vanished, speed=STRIDE * SPEED)
    empty, _ = render([], comes - vanished)
    second, second_truth = render([("walk_left", 0, (700.0, 60.0))], 40, speed=STRIDE * SPEED)
    scene = [(image, truth[0], 1) for image, truth in zip(first, first_truth, strict=True)]
    scene += [(image, None, 0) for image in empty]
    scene += [(image, truth[0], 2) for image, truth in zip(second, second_truth, strict=True)]
    events: list[Event] = []
    for i, (image, box, track) in enumerate(scene):
        boxes = np.array([box] if box else np.zeros((0, 4)), np.float32)
        found = Detections.untracked(boxes, np.ones(len(boxes), np.float32), np.zeros(len(boxes), np.int32),
                                     ("person",)).with_tracker_ids(np.array([track] * len(boxes)))  # fmt: skip
        frame = Frame("c", i, 100.0 + i / 10, i / 10, image, detections=found)
        plugin.process([frame])
        events += frame.events
        owner = plugin._cameras["c"].track_ids.tolist()
        assert owner == ([1] if i < released else [2]), f"frame {i}: the tube serves {owner}"
        assert plugin.pool.in_use == 1
    assert plugin.tubes_refused == released - comes  # the second walker waited on each of those frames
    actions = [(e.type, e.object["track_id"], e.data["action"]) for e in events]
    assert actions == [
        ("action.start", 1, "walk_right"),
        ("action.end", 1, "walk_right"),
        ("action.start", 2, "walk_left"),
    ]
    end = events[1]
    assert end.frame == released and end.data["reason"] == "lost"
    assert end.object["bbox"] == pytest.approx(list(first_truth[vanished - 1][0]))  # where it was last seen
    assert end.data["duration_s"] == pytest.approx(end.ts_wall - events[0].ts_wall)


def test_tube_boxes_and_region_are_float32_on_every_device(monkeypatch):
    """The cutter gives roi_align float32 boxes (and region) whatever the device and the model's precision: on
    the meta device (shapes and dtypes without data) the CUDA path's choices run on a CPU-only machine."""
    from vigild.plugins.actions import tubes

    seen: list[tuple[torch.dtype, torch.dtype]] = []
    real = tubes.roi_align

    def recording(region, rois, **kwargs):
        seen.append((region.dtype, rois[0].dtype))
        return real(region, rois, **kwargs)

    monkeypatch.setattr(tubes, "roi_align", recording)
    for device in ("meta", "cpu"):
        cutter = tubes.TubeCutter(32, torch.device(device))
        crops = cutter(np.zeros((1080, 1920, 3), np.uint8), np.array([[1500.25, 300, 1532.25, 332]], np.float32))
        assert crops.dtype == torch.uint8 and crops.shape == (1, 3, 32, 32)
    assert seen == [(torch.float32, torch.float32)] * 2


def ramp_frame() -> np.ndarray:
    """1920x1080, grey everywhere except a ramp of 4 levels per pixel: column x holds 4 x (x - 1490) for
    1490 <= x < 1554."""
    image = np.zeros((1080, 1920, 3), np.uint8)
    x = np.arange(1490, 1554)
    image[:, x] = (4 * (x - 1490))[None, :, None].astype(np.uint8)
    return image


def test_a_crop_far_right_in_a_wide_frame_is_placed_to_the_pixel(motion_model):
    """A 1920-wide frame, half precision on (bfloat16 on the CPU), a person at x = 1500.25 and another at the left
    edge (so the uploaded region starts at x = 20): the far-right crop is where its box says, to a quarter pixel.
    A box in float16 (1 px steps from 1024 to 2048) or bfloat16 (8 px) would be misplaced; the ramp shows it."""
    from torchvision.ops import roi_align

    plugin = ActionRecognizer(
        action_config(*motion_model, margin=0, half=True), PluginContext("cpu", {"c": CameraConfig(source="c")})
    )
    plugin.start()
    boxes = np.array([[20, 300, 52, 332], [1500.25, 300, 1532.25, 332]], np.float32)  # squares of SIZE (32) px
    found = Detections.untracked(boxes, np.ones(2, np.float32), np.zeros(2, np.int32), ("person",))
    image = ramp_frame()
    plugin.process([Frame("c", 0, 0.0, 0.0, image, detections=found.with_tracker_ids(np.array([1, 2])))])
    slot = plugin._cameras["c"].slots[1]
    crop = plugin.pool.frames[slot, 0]  # (3, S, S), the first crop of track 2
    # Output column j averages the frame at x = 1500.25 + j +- 0.25 (roi_align, aligned, 2 samples per pixel):
    # on the ramp, exactly 4 x (10.25 + j).
    expected = torch.from_numpy(41 + 4 * np.arange(SIZE)).to(torch.uint8).expand(3, SIZE, SIZE)
    assert torch.equal(crop, expected)
    # The same cut with the box as float16 would hold: it misses by a pixel's share of the ramp.
    region = torch.from_numpy(image[300:332, 20:1533]).permute(2, 0, 1).flip(0)[None].float()
    rounded = torch.tensor([[1480.25, 0, 1512.25, 32]]).half().float()
    misplaced = roi_align(region, [rounded], output_size=SIZE, sampling_ratio=2, aligned=True).round()[0]
    assert not torch.equal(misplaced.to(torch.uint8), expected)


def test_half_precision_runs_the_float32_model_under_autocast():
    """`half: true` (bfloat16 on the CPU): the weights stay float32, the convolutions run in bfloat16 through
    autocast, and the scores are float32 and sum to one."""
    config = ActionRecognizerConfig(model="r3d_18", weights=None, mode="frame", clip_len=4, size=32, max_tracks=1,
                                    half=True)  # fmt: skip
    plugin = ActionRecognizer(config, PluginContext("cpu", {}))
    plugin.start()
    module = plugin.video.module
    assert {p.dtype for p in module.parameters()} == {torch.float32}
    assert {b.dtype for b in module.buffers() if b.is_floating_point()} == {torch.float32}
    produced: list[torch.dtype] = []
    module.stem[0].register_forward_hook(lambda _m, _i, out: produced.append(out.dtype))
    scores = plugin.classify(torch.randint(0, 255, (2, 3, 4, 32, 32), dtype=torch.uint8))
    assert produced == [torch.bfloat16]
    assert scores.dtype == np.float32 and np.allclose(scores.sum(1), 1, atol=1e-5)


class FakeModelBrokenInReducedPrecision(torch.nn.Module):
    """Stands for a model with an operation autocast does not cast, so that float32 weights meet a bfloat16
    activation: it runs in float32 and raises under autocast."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(3, 8, 3)
        self.head = torch.nn.Parameter(torch.randn(4, 8))

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        features = self.conv(clips).amax(dim=(2, 3, 4))  # bfloat16 under autocast
        return torch.inner(features, self.head)  # not autocast: mixed types raise


def test_a_model_that_fails_in_reduced_precision_is_refused_at_start(tmp_path):
    """The start-up probe runs as every later batch will (here bfloat16 autocast on the CPU): a model that only
    fails in reduced precision is a config error on `half` at start, not a failure on the first full tube."""
    model_file, labels = tmp_path / "model.ts", tmp_path / "labels.txt"
    torch.jit.script(FakeModelBrokenInReducedPrecision().eval()).save(str(model_file))
    labels.write_text("a\nb\nc\nd\n")
    settings = dict(model=str(model_file), weights=None, labels=labels, clip_len=4, size=16, mode="frame")
    plugin = ActionRecognizer(ActionRecognizerConfig(**settings, half=True), PluginContext("cpu", {}))
    with pytest.raises(PluginConfigError) as raised:
        plugin.start()
    assert raised.value.key == "half"
    assert "fails in bfloat16 (autocast) on cpu but runs in float32" in str(raised.value)
    assert "set `half: false`" in str(raised.value)
    plugin = ActionRecognizer(ActionRecognizerConfig(**settings, half=False), PluginContext("cpu", {}))
    plugin.start()  # the same model in float32 is fine
    assert plugin.classify(torch.zeros((1, 3, 4, 16, 16), dtype=torch.uint8)).shape == (1, 4)


def test_a_crop_is_the_same_whatever_else_is_cut_from_the_frame():
    """The cutter uploads only the part of the frame its boxes need: each crop must still be what it cuts from the
    whole frame (a 2x2 mean filter, then one bilinear sample a crop pixel), alone or beside other boxes, for boxes at
    any fraction of a pixel."""
    from torchvision.ops import roi_align

    from vigild.plugins.actions.tubes import TubeCutter

    rng = np.random.default_rng(7)
    image = rng.integers(0, 256, (576, 768, 3), dtype=np.uint8)
    whole = torch.from_numpy(image).permute(2, 0, 1).flip(0)[None].float()
    corner = rng.uniform(40, 400, (20, 2))
    boxes = np.concatenate([corner, corner + rng.uniform(20, 160, (20, 1))], axis=1).astype(np.float32)
    truth = torch.empty((len(boxes), 3, SIZE, SIZE))
    for i, box in enumerate(boxes):  # the definition, box by box, from the whole frame
        d = max(1, round((box[2] - box[0]) / SIZE / 2))  # SIZE 32: filters of 1, 2 and 3 pixels here
        smooth = (whole[..., :-d, :-d] + whole[..., d:, :-d] + whole[..., :-d, d:] + whole[..., d:, d:]) / 4
        truth[i] = roi_align(smooth, [torch.from_numpy(box[None] - d / 2)], output_size=SIZE, sampling_ratio=1,
                             aligned=True)[0]  # fmt: skip
    cutter = TubeCutter(SIZE, torch.device("cpu"))
    # The coordinates shift with the region, so the float32 interpolation differs by rounding (~0.003): a value
    # near .5 may round either way. A sample taken from the wrong pixels is off by far more on this noise.
    assert_same_crops(cutter(image, boxes), truth)
    for i in range(len(boxes)):
        assert_same_crops(cutter(image, boxes[i : i + 1]), truth[i : i + 1])


def test_a_box_an_even_number_of_times_the_crops_size_is_cut_as_the_mean_of_four_samples_a_pixel():
    """For a box 2, 4 or 6 times the crop's side, the cutter's filter and sample equal roi_align with four samples a
    crop pixel (two a side, a quarter of a crop pixel from its centre), near and far people in one frame."""
    from torchvision.ops import roi_align

    from vigild.plugins.actions.tubes import TubeCutter

    rng = np.random.default_rng(8)
    image = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    whole = torch.from_numpy(image).permute(2, 0, 1).flip(0)[None].float()
    side = np.repeat([2 * SIZE, 4 * SIZE, 6 * SIZE], 4)[:, None]  # steps of 2, 4 and 6 pixels
    corner = rng.uniform(0, 1, (len(side), 2)) * (np.array([640, 480]) - side - 1)
    boxes = np.concatenate([corner, corner + side], axis=1).astype(np.float32)
    truth = roi_align(whole, [torch.from_numpy(boxes)], output_size=SIZE, sampling_ratio=2, aligned=True)
    assert_same_crops(TubeCutter(SIZE, torch.device("cpu"))(image, boxes), truth)


def assert_same_crops(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """uint8 crops equal to within one level of rounding."""
    assert actual.shape == expected.shape and actual.dtype == torch.uint8
    assert float((actual.float() - expected.float()).abs().max()) <= 1


class GatedVideoModel(torch.nn.Module):
    """The real model, held at the door of each forward pass until the test opens `gate` (a slow model, at will)."""

    def __init__(self, model: torch.nn.Module, gate: threading.Event):
        super().__init__()
        self.model, self.gate = model, gate

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        assert self.gate.wait(60), "the test never opened the gate"
        return self.model(clips)


def wait_until(condition, what: str, timeout: float = 60.0) -> None:
    """Wait for a state the worker reaches by itself (no timing is asserted: only that it gets there)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.01)


def branch_recognizer(motion_model, published: list[Event], **overrides) -> ActionRecognizer:
    config = action_config(*motion_model, branch=True, **overrides)
    context = PluginContext("cpu", {"r": CameraConfig(source="r")}, placement="thread", publish=published.append)
    plugin = ActionRecognizer(config, context)
    plugin.start()
    return plugin


def walkers(images, truths, i: int) -> Frame:
    """Frame `i` of the two-walker scene with its true boxes as tracks 1 (walking left) and 2 (walking right)."""
    boxes = np.array([truths[i][p] for p in (0, 1)], np.float32)
    found = Detections.untracked(boxes, np.ones(2, np.float32), np.zeros(2, np.int32), ("person",))
    return Frame("r", i, 100.0 + i / 10, i / 10, images[i], detections=found.with_tracker_ids(np.array([1, 2])))


def test_as_a_branch_the_chain_never_waits_for_the_model_and_the_newest_clips_are_classified(motion_model):
    """The recognizer as a branch, its model held shut: the chain's part (cutting tubes) goes on frame after frame,
    clips due (frames 21, 33, 45... : a crop every 3 frames, 8 a clip, then every 4 crops) beyond the backlog of 2
    are skipped oldest first and counted, and the worker classifies the newest. Opened, it catches up; its events
    carry the frame they describe (index, time, the walker's box there), an end never before its start; the
    camera's closing publishes each action's end before `on_source_end` returns."""
    published: list[Event] = []
    plugin = branch_recognizer(motion_model, published, interval=4, backlog=2, max_batch=2)
    worker = plugin.branch_work()
    assert worker is not None and worker.unit == "clips"
    gate = threading.Event()
    plugin.run.module = GatedVideoModel(plugin.run.module, gate)
    # at 3 px a frame: at the scene's 4, walker 2 reaches the part of the plaza (x 550-620, frames 108-126) where
    # the tiny test model takes it for standing, whichever way it is cut
    images, truths = render(SCENE[:2], 130, speed=3.0)
    due = [21 + 12 * k for k in range(10)]  # 21, 33, ... 129
    for i in range(97):
        frame = walkers(images, truths, i)
        plugin.process([frame])
        assert not frame.events, "a branch's events are published by its worker, never put on the chain's frames"
        if i == 21:
            wait_until(lambda: plugin.worker.working, "the worker takes frame 21's clips")
    # 21 is in the model; 33, 45, 57, 69, 81 were pushed out by newer ones (2 clips each); 93 waits
    assert worker.skipped_total == 10 and worker.pending == 2 and published == []
    gate.set()
    wait_until(lambda: worker.pending == 0 and not plugin.worker.working, "the worker catches up")
    for i in range(97, 130):
        plugin.process([walkers(images, truths, i)])
        if i in due:
            wait_until(lambda: worker.pending == 0 and not plugin.worker.working, f"frame {i}'s clips")
    assert worker.skipped_total == 10 and plugin.worker.classified == 2 * 5  # frames 21, 93, 105, 117, 129
    assert plugin.on_source_end("r", 200.0, 130) == []
    plugin.stop()
    starts = [e for e in published if e.type == "action.start"]
    ends = [e for e in published if e.type == "action.end"]
    assert sorted(e.data["action"] for e in starts) == ["walk_left", "walk_right"]
    assert sorted(e.data["action"] for e in ends) == ["walk_left", "walk_right"]
    for event in starts:
        assert event.frame in (93, 105, 117, 129) and event.ts_wall == 100.0 + event.frame / 10
        person = {1: 0, 2: 1}[event.object["track_id"]]
        np.testing.assert_allclose(event.object["bbox"], truths[event.frame][person], atol=0.06)
    assert all(e.frame == 130 and e.ts_wall == 200.0 and e.data["reason"] == "source_end" for e in ends)
    assert [e.frame for e in published] == sorted(e.frame for e in published)


def test_as_a_branch_a_model_failure_costs_only_its_clips(motion_model):
    """The model fails on its first call, on the worker: those 2 clips are counted as failed, the chain's frames are
    untouched, and the clips due later are classified."""
    published: list[Event] = []
    plugin = branch_recognizer(motion_model, published, interval=4)
    plugin.run.module = FakeFailingVideoModel(plugin.run.module, fail_on=1)
    images, truths = render(SCENE[:2], 60)
    for i in range(60):
        frame = walkers(images, truths, i)
        plugin.process([frame])
        if i in (21, 33, 45, 57):
            wait_until(lambda: plugin.worker.pending == 0 and not plugin.worker.working, f"frame {i}'s clips")
    assert plugin.worker.failed == 2 and plugin.worker.classified == 6 and plugin.worker.skipped_total == 0
    plugin.on_source_end("r", 200.0, 60)
    plugin.stop()
    assert {e.data["action"] for e in published if e.type == "action.start"} == {"walk_left", "walk_right"}


def test_a_closing_ends_the_workers_rest_at_once(motion_model):
    """A branch that may work 1 % of its time rests 99 times as long as each round took. A camera's closing must not
    wait for that: on_source_end returns with every action's end published (it waits up to 5 s, and the rest after
    the rounds here would last minutes)."""
    published: list[Event] = []
    plugin = branch_recognizer(motion_model, published, interval=4, branch_share=0.01)
    gate = threading.Event()
    plugin.run.module = GatedVideoModel(plugin.run.module, gate)
    images, truths = render(SCENE[:2], 60)
    for i in range(58):
        plugin.process([walkers(images, truths, i)])
        if i == 21:
            wait_until(lambda: plugin.worker.working, "the worker takes frame 21's clips")
            time.sleep(2)  # the round lasts at least 2 s: the rest after it at least 198 s
            gate.set()
            wait_until(lambda: not plugin.worker.working, "the round of frame 21 ends and the rest begins")
    assert plugin.worker.classified == 2 and plugin.worker.pending > 0, "resting: later clips wait"
    plugin.on_source_end("r", 200.0, 58)
    ends = [e for e in published if e.type == "action.end"]
    assert plugin.worker.pending == 0 and [e.data["reason"] for e in ends] == ["source_end"] * 2
    assert {e.object["track_id"] for e in ends} == {e.object["track_id"] for e in published if e.type == "action.start"}
    plugin.stop()

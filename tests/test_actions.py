"""Action recognition: tubes, models, events, on motion that only a temporal model can tell apart."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from action_scene import CLIP_LEN, MARGIN, MEAN, SCENE, SCENE_FRAMES, SIZE, STD, STRIDE, render, train
from torchvision.ops import box_iou

from vigild.config import CameraConfig, PluginSpec
from vigild.events import Event
from vigild.frame import Detections, Frame
from vigild.plugin import PluginConfigError, PluginContext
from vigild.plugins.action_recognizer import ActionRecognizer, ActionRecognizerConfig
from vigild.plugins.backends.video_models import TORCHVISION_VIDEO_MODELS

TRUE = {person: action for person, (action, _, _) in enumerate(SCENE)}
FLIPPED = {"walk_left": "walk_right", "walk_right": "walk_left", "stand": "stand", "bob": "bob"}


@pytest.fixture(scope="session")
def motion_model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("motion-model")
    began = time.monotonic()
    model, labels = train(directory)
    assert time.monotonic() - began < 120
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


def run_chain(motion_model, reverse: bool) -> tuple[list[Event], list[dict]]:
    from conftest import yolo_fastest

    from vigild.chain import Chain
    from vigild.plugins.bytetrack import ByteTrack, ByteTrackConfig
    from vigild.plugins.detector import Detector

    detector, tracker = yolo_fastest(0.3), ByteTrackConfig(update_interval=1.0)
    actions = action_config(*motion_model)
    chain = Chain(
        (
            PluginSpec("detector", Detector, detector, {"r": detector}),
            PluginSpec("bytetrack", ByteTrack, tracker, {"r": tracker}),
            PluginSpec("action_recognizer", ActionRecognizer, actions, {"r": actions}),
        ),
        "cpu",
        {"r": CameraConfig(source="rendered")},
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
    return events, truths


@pytest.mark.e2e
def test_the_daemon_tells_each_subscriber_the_true_action_of_each_person_and_no_other(
    tmp_path, motion_model, endpoint, subscriber_factory
):
    """As a user runs it: the rendered scene as a video file, `vigild run` with the real detector, ByteTrack and
    the action recognizer with the user's TorchScript model and labels file, a plain pyzmq subscriber in its own
    process."""
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
publisher:
  endpoint: {endpoint}
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
def test_played_backwards_walking_left_becomes_walking_right(motion_model):
    """Through the real detector and tracker, in-process, on the scene played backwards: the model says what the
    reversed motion is, so time order is kept from the capture to the clip."""
    reverse = True
    events, truths = run_chain(motion_model, reverse)
    found = actions_by_person(events, truths)
    expected = {person: {FLIPPED[a] if reverse else a} for person, a in TRUE.items()}
    assert found == expected
    starts = [e for e in events if e.type == "action.start"]
    ends = [e for e in events if e.type == "action.end"]
    assert sorted((e.object["track_id"], e.data["action"]) for e in starts) == sorted(
        (e.object["track_id"], e.data["action"]) for e in ends
    ), "every action.start gets one action.end"
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
    boxes = np.array([[10 + 30 * i, 10, 30 + 30 * i, 60] for i in range(len(ids))], np.float32)
    d = Detections.untracked(boxes, np.ones(len(ids), np.float32), np.zeros(len(ids), np.int32), ("person",))
    return d.with_tracker_ids(np.array(ids, np.int64))


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
            frame.events += [Event("track.end", "c", i / 10, i, {"track_id": t}) for t in ending]
            live += list(range(next_id, next_id + 6))
            next_id += 6
        frame.detections = tracked(live)
        plugin.process([frame])
        assert plugin.pool.in_use == len(live)
    assert plugin.pool.frames.data_ptr() == storage
    crowd = Frame("c", 301, 30.1, 30.1, image, detections=tracked(list(range(10_000, 10_050))))
    plugin.process([crowd])
    assert plugin.pool.in_use == 40 and plugin.tubes_refused == 50 - (40 - len(live))
    plugin.on_source_end("c", 31.0, 301)
    assert plugin.pool.in_use == 0


def test_whole_frame_mode_classifies_the_camera_view(motion_model):
    images, _ = render([("walk_right", 1, (120.0, 190.0))], 60)
    plugin = ActionRecognizer(
        action_config(*motion_model, mode="frame", margin=0), PluginContext("cpu", {"c": CameraConfig(source="c")})
    )
    plugin.start()
    for i, image in enumerate(images):
        plugin.process([Frame("c", i, i / 10, i / 10, image)])
    assert plugin.clips_seen[plugin._cameras["c"].slots[0]] >= 3  # 20 samples: full at 8, then every 4


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

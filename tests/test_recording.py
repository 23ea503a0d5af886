"""Recording (docs/recording.md): clips cut from the camera's own stream without re-encoding, linked from their events.

Ground truth the tests know: the source files' own coded pictures (vtest.avi's first 400 frames encoded once with
x264/x265 at 10 fps, a keyframe every 10 frames: `encoded_media`), read with gst-launch and split at start codes
(tests/recording_tools.py), and the frame numbers of the triggering frames (their PTS at 10 fps). A clip's pictures
must be a run of the source's, byte for byte, starting at a keyframe within one GOP before `ts - pre_s`.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
from conftest import ROOT, daemon_env, fill, yolo_fastest_yaml
from recording_tools import audio_seconds, encode_with_audio, pictures, position_in, record_camera, video_info
from service import Service, service_config

from vigild.config.loading import ConfigError, load_config
from vigild.config.recording import CameraRecordingConfig, RecordingConfig

FPS = 10.0
GOP = 10
"""encoded_media: x264/x265 `key-int-max=10` at 10 fps."""
PRE, POST = 2.0, 3.0
H264, H265 = ("avc1", "h264"), ("hvc1", "hev1", "hevc", "h265")
"""The codec as OpenCV's FFmpeg names it (the sample entry, or the codec)."""


def settings(**values) -> CameraRecordingConfig:
    return CameraRecordingConfig.model_validate({"events": ["line.cross"], "pre_s": PRE, "post_s": POST, **values})


def source_frame(frame) -> int:
    """The source frame number of a frame captured from a file (its PTS at 10 fps)."""
    return round(frame.pts_ms / 1000 * FPS)


def saved_clips(recorded) -> list[dict]:
    return [e.data for e in recorded.of_type("clip.saved")]


def clip_file(tmp_path: Path, data: dict) -> Path:
    return tmp_path / "recordings" / data["path"]


# ----- the config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "vigild.yaml"
    path.write_text(text)
    return path


CAMERAS = "cameras:\n  door:\n    source: test://\n"


def test_a_minimal_section_is_valid_and_a_camera_overrides_the_defaults(tmp_path):
    config = load_config(write(tmp_path, CAMERAS + "  yard:\n    source: test://\n    recording: {pre_s: 1}\n"
                               "  hall:\n    source: test://\n    recording: {enabled: false}\n"
                               "recording: {events: [track.new], pre_s: 2, post_s: 3}\n"))  # fmt: skip
    door, yard = config.settings.camera_recording("door"), config.settings.camera_recording("yard")
    assert door is not None and yard is not None and config.settings.camera_recording("hall") is None
    assert (door.pre_s, door.post_s, door.max_s, [t.type for t in door.events]) == (2, 3, 30, ["track.new"])
    assert (yard.pre_s, yard.post_s, [t.type for t in yard.events]) == (1, 3, ["track.new"])


@pytest.mark.parametrize(
    ("section", "key", "expected"),
    [
        ("recording: {events: [clip.saved]}\n", "recording.events.0.type", "would match the clip events"),
        ("recording: {events: [line.cross], pre: 2}\n", "recording.pre", "unknown key"),
        ("recording: {events: [{type: line.cross, labels: person}]}\n", "recording.events.0.labels", "list"),
        ("recording: {events: [line.cross], pre_s: -1}\n", "recording.pre_s", "greater than or equal to 0"),
        ("recording: {pre_s: 1}\n", "recording", "no camera records anything"),
        ("recording: {events: [line.cross]}\njournal: {enabled: false}\n", "recording", "recording needs the journal"),
    ],
)
def test_a_bad_section_names_the_file_line_and_key(tmp_path, section, key, expected):
    path = write(tmp_path, CAMERAS + section)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    text = str(caught.value)
    assert str(path) in text and expected in text, text
    assert (key in text and ":4" in text) or not key, text  # line 4: the `recording:` line


# ----- clips from the camera's own stream (real capture, the daemon's real recording, events at chosen times)


@pytest.mark.timeout(180)
def test_crossings_make_clips_of_the_source_pictures_and_two_crossings_2s_apart_make_one(tmp_path, encoded_media):
    """An H.264 file played at its rate: crossings at 6 s and 8 s (one clip, extended), and at 17 s (the next one).
    Each clip is the source's own pictures (no re-encode), starts at a keyframe within one GOP before `ts - pre_s`,
    ends `post_s` after its last trigger (within a GOP), has the source's codec and size, and its events are found
    from it (`events`)."""
    source = encoded_media["h264"]
    crossings = {"type": "line.cross", "labels": ["person"], "retain_days": 30}  # kept longer than the default 10
    recorded = record_camera(tmp_path, str(source), settings(events=[crossings]), [6.0, 8.0, 17.0], until_saved=2,
                             timeout=60)  # fmt: skip
    saved = saved_clips(recorded)
    assert len(saved) == 2, [e.type for e in recorded.published]
    kept = dict(sqlite3.connect(tmp_path / "journal.db").execute("SELECT id, retain_until FROM clips"))
    for data, (item, _) in ((saved[0], recorded.triggers[1]), (saved[1], recorded.triggers[2])):
        assert abs(kept[data["clip_id"]] - (item.event.ts_wall + 30 * 86400)) < 1  # the last trigger's ts + 30 d
    truth = pictures(source, "h264")
    (first, first_frame), (second, second_frame), (third, third_frame) = recorded.triggers
    for data, triggers in ((saved[0], [(first, first_frame), (second, second_frame)]), (saved[1], [(third, third_frame)])):
        assert data["events"] == [item.id for item, _ in triggers]  # started, then extended: one clip
        path = clip_file(tmp_path, data)
        clip = pictures(path, "h264")
        start = position_in(truth, clip)  # byte-equal pictures: no re-encode
        assert clip[0].key
        wanted = source_frame(triggers[0][1]) - PRE * FPS
        assert wanted - GOP < start <= wanted, (start, wanted)
        end = source_frame(triggers[-1][1]) + POST * FPS  # the frame number where the clip should end
        assert abs(start + len(clip) - end) <= GOP, (start, len(clip), end)
        info = video_info(path)
        assert (info["width"], info["height"]) == (768, 576) and info["fourcc"].lower() in H264, info
        assert info["frames"] == len(clip)
        assert data["codec"] == "h264" and data["frames"] == len(clip) and data["bytes"] == path.stat().st_size
        assert abs(data["duration_s"] - len(clip) / FPS) < 0.15
    assert not list((tmp_path / "recordings").rglob("*.part")), "no half-written file left"


@pytest.mark.timeout(180)
def test_over_rtsp_two_crossings_make_one_clip_of_the_cameras_pictures(tmp_path, encoded_media):
    """The same file served by a real RTSP server (its own process): two crossings 2 s apart make one clip whose
    pictures are a run of the camera's, from a keyframe, `pre_s` + 2 s + `post_s` long within a GOP."""
    from streams import RtspServer

    server = RtspServer({"/cam": encoded_media["h264"]}).start()
    try:
        recorded = record_camera(tmp_path, server.url("/cam"), settings(), [6.0, 8.0], timeout=60)
    finally:
        server.kill()
    saved = saved_clips(recorded)
    assert len(saved) == 1 and saved[0]["events"] == [item.id for item, _ in recorded.triggers], recorded.published
    clip = pictures(clip_file(tmp_path, saved[0]), "h264")
    position_in(pictures(encoded_media["h264"], "h264"), clip)
    assert clip[0].key
    assert abs(len(clip) - (PRE + 2.0 + POST) * FPS) <= GOP, len(clip)
    start_ts = datetime.fromisoformat(saved[0]["start"]).timestamp()
    wanted = recorded.triggers[0][0].event.ts_wall - PRE
    assert -0.15 <= wanted - start_ts < GOP / FPS + 0.15, (wanted, start_ts)


@pytest.mark.timeout(180)
def test_a_camera_that_drops_mid_clip_ends_the_clip_cleanly_where_the_stream_ended(tmp_path, encoded_media):
    """The RTSP server killed (a camera losing power) 4 s into a clip meant to last 23 s: the clip is saved where
    the stream ended (`stream_ended`), playable, the camera's pictures up to then."""
    from streams import RtspServer

    server = RtspServer({"/cam": encoded_media["h264"]}).start()
    try:
        recorded = record_camera(tmp_path, server.url("/cam"), settings(post_s=20.0), [4.0], timeout=60,
                                 actions={8.0: server.kill}, camera={"stall_timeout": 3})  # fmt: skip
    finally:
        server.kill()
    (data,) = saved_clips(recorded)
    assert data["reason"] == "stream_ended", data
    clip = pictures(clip_file(tmp_path, data), "h264")
    position_in(pictures(encoded_media["h264"], "h264"), clip)
    assert (PRE + 2.0) * FPS <= len(clip) <= (PRE + 6.0) * FPS + GOP, len(clip)
    assert video_info(clip_file(tmp_path, data))["frames"] == len(clip)


@pytest.mark.timeout(180)
def test_a_resolution_change_ends_the_clip_at_the_change(tmp_path):
    """An H.264 stream whose size changes from 640x480 to 320x240 (new SPS and keyframe, as a camera does when its
    setting changes) 6 s in, a clip asked from 3 s to 12 s: it ends at the change (`format_changed`), playable, all
    640x480; capture goes on."""
    from conftest import VTEST
    from streams import encode_size_change

    stream, counts = encode_size_change(VTEST, tmp_path / "sizes.h264", ((640, 480), (320, 240)), 60)
    recorded = record_camera(tmp_path, str(stream), settings(pre_s=1.0, post_s=8.0), [4.0], timeout=60,
                             linger_s=2.0)  # fmt: skip
    (data,) = saved_clips(recorded)
    assert data["reason"] == "format_changed" and (data["width"], data["height"]) == (640, 480), data
    info = video_info(clip_file(tmp_path, data))
    assert (info["width"], info["height"]) == (640, 480) and 15 <= info["frames"] <= counts[0], (info, counts)
    assert recorded.frames_after_last_report > 5, "capture went on at the new size"


@pytest.mark.timeout(180)
def test_a_stream_without_keyframes_for_longer_than_memory_starts_clips_late_or_drops_them(tmp_path, monkeypatch):
    """Keyframes 10 s apart and room in memory for under a second of stream: a clip whose window holds no keyframe
    is dropped (`no_keyframe`); one whose window reaches the next keyframe starts there (later than asked)."""
    from conftest import VTEST

    import vigild.capture.recorder as recorder

    monkeypatch.setattr(recorder, "RING_MAX_BYTES", 150_000)
    source = tmp_path / "long_gop.mp4"
    subprocess.run(["gst-launch-1.0", "-q", *f"filesrc location={VTEST} ! decodebin ! identity eos-after=200 ! "
                    "videoconvert ! x264enc speed-preset=ultrafast key-int-max=100 bitrate=2000 ! h264parse ! mp4mux ! "
                    f"filesink location={source}".split()], check=True, timeout=120)  # fmt: skip
    recorded = record_camera(tmp_path, str(source), settings(pre_s=1.0, post_s=3.0), [2.0, 7.5], until_saved=2,
                             timeout=60)  # fmt: skip
    (dropped,) = recorded.of_type("clip.dropped")
    assert dropped.data["reason"] == "no_keyframe" and dropped.data["events"] == [recorded.triggers[0][0].id]
    (data,) = saved_clips(recorded)
    clip = pictures(clip_file(tmp_path, data), "h264")
    assert position_in(pictures(source, "h264"), clip) == 100 and clip[0].key  # the keyframe at 10 s
    late = datetime.fromisoformat(data["start"]).timestamp() - (recorded.triggers[1][0].event.ts_wall - 1.0)
    assert 3.2 < late < 3.7, late  # asked from 6.5 s, started at 10 s: 3.5 s later (to within a frame or two)


@pytest.mark.timeout(180)
def test_aac_audio_is_kept_other_audio_is_dropped(tmp_path):
    """A camera that sends AAC with its H.264: the clip has both, the audio as long as the video (within 0.3 s);
    one that sends Opus: the clip has the video alone."""
    for codec in ("aac", "opus"):
        folder = tmp_path / codec
        folder.mkdir()
        source = encode_with_audio(folder / f"with_{codec}.{'mp4' if codec == 'aac' else 'mkv'}", codec, 100)
        recorded = record_camera(folder, str(source), settings(pre_s=1.0, post_s=3.0), [4.0], timeout=40)
        (data,) = saved_clips(recorded)
        path = folder / "recordings" / data["path"]
        clip = pictures(path, "h264")
        assert position_in(pictures(source, "h264") if codec == "aac" else clip, clip) >= 0
        sound = audio_seconds(path)
        if codec == "aac":
            assert abs(sound - len(clip) / FPS) < 0.3, (sound, len(clip))
        else:
            assert sound == 0.0


@pytest.mark.timeout(180)
def test_h265_is_kept_as_it_is(tmp_path, encoded_media):
    source = encoded_media["h265"]
    recorded = record_camera(tmp_path, str(source), settings(pre_s=1.0, post_s=2.0), [4.0], timeout=40)
    (data,) = saved_clips(recorded)
    clip = pictures(clip_file(tmp_path, data), "h265")
    position_in(pictures(source, "h265"), clip)
    assert data["codec"] == "h265" and clip[0].key
    assert video_info(clip_file(tmp_path, data))["fourcc"].lower() in H265


@pytest.mark.timeout(180)
def test_with_continuous_segments_a_clip_is_a_reference_cut_from_them_when_asked(tmp_path, encoded_media):
    """`continuous: {segment_s: 4}`: segments follow one another without a gap (together, a run of the source's
    pictures); a crossing's clip is a window of them (no file of its own, no bytes) until it is asked for, then cut
    from them without re-encoding, from the keyframe within one GOP before `ts - pre_s` to `ts + post_s`."""
    from vigild.capture.recorder import exported
    from vigild.outputs.clip_store import ClipStore, export_relative

    source = encoded_media["h264"]
    recorded = record_camera(tmp_path, str(source), settings(continuous={"segment_s": 4}), [7.0], timeout=60)
    (data,) = saved_clips(recorded)
    assert data["reference"] is True and data["path"] == "" and len(data["segments"]) >= 2, data
    truth = pictures(source, "h264")
    store = ClipStore(tmp_path / "journal.db")
    row = store.get(data["clip_id"])
    segments = store.segments_between("cam", 0, 1e12)
    store.close()
    assert row is not None and row.ref and row.bytes == 0
    saved_segments = [s for s in segments if s.state == "saved"]
    assert len(saved_segments) >= 3
    assert all(abs(s.retain_until - (s.start_ts + 86400)) < 5 for s in saved_segments), "kept continuous.retain_days"
    run = [picture for s in saved_segments for picture in pictures(s.file, "h264")]
    assert position_in(truth, run) == 0, "the segments are the source's pictures, one after the other"
    assert all(pictures(s.file, "h264")[0].key for s in saved_segments)
    files = [(s.file, s.start_ts) for s in saved_segments]
    path = exported(tmp_path / "recordings", export_relative(row.id), "cam", row.id, files, row.start_ts, row.end_ts)
    clip = pictures(path, "h264")
    start = position_in(truth, clip)
    (_, frame) = recorded.triggers[0]
    wanted = source_frame(frame) - PRE * FPS
    assert clip[0].key and wanted - GOP < start <= wanted, (start, wanted)
    assert abs(start + len(clip) - (source_frame(frame) + POST * FPS)) <= GOP, (start, len(clip))


@pytest.mark.timeout(120)
def test_a_raw_source_is_encoded_for_recording_only(tmp_path):
    """test:// sends raw video: the recording branch encodes H.264 (a keyframe every 2 s), which a player reads."""
    recorded = record_camera(tmp_path, "test://ball", settings(pre_s=1.0, post_s=2.0), [4.0], timeout=40,
                             camera={"resize": [320, 240]})  # fmt: skip
    (data,) = saved_clips(recorded)
    info = video_info(clip_file(tmp_path, data))
    assert data["codec"] == "h264" and info["fourcc"].lower() in H264
    assert (info["width"], info["height"]) == (640, 480)  # the source's size: not what the chain was given
    assert 2.5 * 30 <= info["frames"] <= 5.5 * 30, info  # 30 fps: from the keyframe before ts - 1 s to ts + 2 s


@pytest.mark.timeout(120)
def test_a_full_disk_drops_the_clip_counts_it_and_capture_goes_on(tmp_path, small_disk, encoded_media):
    section = RecordingConfig.model_validate({"events": ["line.cross"], "path": str(small_disk / "rec")})
    (small_disk / "rec").mkdir()
    fill(small_disk)
    recorded = record_camera(tmp_path, str(encoded_media["h264"]), settings(pre_s=1.0, post_s=1.0), [3.0],
                             section=section, timeout=40, linger_s=3.0)  # fmt: skip
    dropped = recorded.of_type("clip.dropped")
    assert [e.data["reason"] for e in dropped] == ["disk_full"], recorded.published
    assert recorded.status["dropped"] == {"disk_full": 1} and recorded.status["saved"] == 0
    assert recorded.frames_after_last_report > 10, "capture went on"
    assert not [p for p in (small_disk / "rec").rglob("*") if p.is_file()], "nothing half-written left"


# ----- the daemon


def daemon_config(tmp_path: Path, cameras: str, recording: str, plugins: str = "  - type: frame_echo\n",
                  extra: str = "") -> Path:  # fmt: skip
    return service_config(tmp_path, cameras, f"ipc://{tmp_path}/pub", plugins=plugins,
                          extra=f"journal:\n  path: {tmp_path / 'journal.db'}\nrecording: {recording}\n{extra}")  # fmt: skip


def journal_rows(tmp_path: Path, sql: str, args: tuple = ()) -> list[tuple]:
    database = tmp_path / "journal.db"
    if not database.exists():
        return []
    db = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        return db.execute(sql, args).fetchall()
    except sqlite3.OperationalError:  # the tables are not there yet
        return []
    finally:
        db.close()


def journal_events(tmp_path: Path, kind: str) -> list[dict]:
    return [json.loads(b) for (b,) in journal_rows(tmp_path, "SELECT body FROM events WHERE type = ? ORDER BY seq", (kind,))]


def wait(condition, what: str, service: Service, timeout: float = 90):
    deadline = time.monotonic() + timeout
    while True:
        got = condition()
        if got:
            return got
        if service.process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"never: {what}; log: {service.log_text()[-2500:]}")
        time.sleep(0.2)


@pytest.mark.e2e
@pytest.mark.capture_modes
@pytest.mark.timeout(240)
def test_the_daemon_records_the_same_clip_in_either_capture_mode(tmp_path, encoded_media):
    """`camera.up` starts a clip (pre 0, post 3 s): the file's first pictures, byte for byte, from the first
    keyframe, 3 s within a GOP; `clip.start` and `clip.saved` are in the journal, the clip found from its event."""
    source = encoded_media["h264"]
    config = daemon_config(tmp_path, f"  cam:\n    source: {source}\n", "{events: [camera.up], pre_s: 0, post_s: 3}")
    service = Service(tmp_path, config)
    try:
        saved = wait(lambda: journal_events(tmp_path, "clip.saved"), "a clip saved", service)
    finally:
        code, _ = service.stop()
    assert code == 0, service.log_text()[-2000:]
    (up,) = journal_events(tmp_path, "camera.up")
    (start,) = journal_events(tmp_path, "clip.start")
    data = saved[0]
    assert data["events"] == [up["id"]] and start["clip_id"] == data["clip_id"]
    path = tmp_path / "journal.db"
    rows = journal_rows(tmp_path, "SELECT root, path, state FROM clips WHERE id = ?", (data["clip_id"],))
    (root, relative, state) = rows[0]
    assert state == "saved" and Path(root) == path.parent / "recordings" and relative == data["path"]
    clip = pictures(Path(root) / relative, "h264")
    assert position_in(pictures(source, "h264"), clip) == 0  # the file's first picture, a keyframe
    assert abs(len(clip) - 3 * FPS) <= GOP, len(clip)
    out = tmp_path / "copy.mp4"
    copied = subprocess.run([sys.executable, "-m", "vigild", "clip", up["id"], "--config", str(config), "-o", str(out)],
                            env=daemon_env(), cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert copied.returncode == 0, copied.stderr
    assert out.read_bytes() == (Path(root) / relative).read_bytes()
    listed = subprocess.run([sys.executable, "-m", "vigild", "events", "--config", str(config), "--type", "camera.up"],
                            env=daemon_env(), cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
    (shown,) = [json.loads(line) for line in listed.stdout.splitlines()]
    assert shown["clip"]["id"] == data["clip_id"] and shown["clip"]["state"] == "saved"
    assert {k: v for k, v in shown.items() if k != "clip"} == up, "the event itself is as published"
    none = subprocess.run([sys.executable, "-m", "vigild", "clip", str(start["seq"]), "--config", str(config), "-o",
                           str(tmp_path / "none.mp4")], env=daemon_env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert none.returncode == 1 and "has no clip" in none.stderr and not (tmp_path / "none.mp4").exists()


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_a_sigkill_in_the_middle_of_a_clip_leaves_a_playable_prefix_after_the_next_start(tmp_path, encoded_media):
    """A clip that would last 60 s, its daemon killed (SIGKILL) after some seconds of it: the next start remuxes the
    fragments written so far into a playable file of the source's pictures (or removes what cannot play), concludes
    its row, and leaves no `.part`."""
    source = encoded_media["h264"]
    config = daemon_config(tmp_path, f"  cam:\n    source: {source}\n    loop: true\n",
                           "{events: [camera.up], pre_s: 0, post_s: 60, max_s: 60}")  # fmt: skip
    service = Service(tmp_path, config)
    recordings = tmp_path / "recordings"
    try:
        wait(lambda: journal_events(tmp_path, "clip.start"), "the clip started", service)
        wait(lambda: sum(p.stat().st_size for p in recordings.rglob("*.part")) > 600_000, "fragments written", service)
    finally:
        service.kill()
    (part,) = list(recordings.rglob("*.part"))
    (tmp_path / "again").mkdir()
    service = Service(tmp_path / "again", config)  # the same config, journal and recordings
    try:
        wait(lambda: journal_rows(tmp_path, "SELECT state FROM clips WHERE state IN ('saved', 'dropped') AND "
                                  "reason IN ('repaired', 'killed')"), "the cut-off clip concluded", service)  # fmt: skip
    finally:
        code, _ = service.stop()
    assert code == 0, service.log_text()[-2000:]
    assert not part.exists() and not list(recordings.rglob("*.part"))
    (state, relative, frames) = journal_rows(tmp_path, "SELECT state, path, frames FROM clips WHERE reason = 'repaired'")[0]
    clip = pictures(recordings / relative, "h264")
    assert state == "saved" and len(clip) == frames >= 20
    assert position_in(pictures(source, "h264"), clip) == 0
    assert video_info(recordings / relative)["frames"] == len(clip)
    (saved,) = [e for e in journal_events(tmp_path, "clip.saved") if e.get("repaired")]
    assert saved["path"] == relative


@pytest.mark.timeout(120)
def test_retention_removes_the_oldest_clips_and_keeps_their_events(tmp_path, encoded_media):
    """Clips past their days go, then the oldest beyond the size cap; a clip being written stays; rows stay
    (`expired`) and `vigild clip` says what happened."""
    from vigild.outputs.clip_store import ClipStore
    from vigild.outputs.journal import Journal
    from vigild.recording.manager import Recording

    database, root = tmp_path / "journal.db", tmp_path / "recordings"
    journal = Journal(database)
    journal.close()
    store = ClipStore(database)
    body = encoded_media["h264"].read_bytes()[:300_000]
    now = time.time()
    for i, (age_days, keep_days, state) in enumerate([(20, 10, "saved"), (5, 10, "saved"), (4, 10, "saved"),
                                                      (3, 10, "saved"), (0, 10, "writing")]):  # fmt: skip
        relative = f"cam/clip{i}.mp4"
        (root / "cam").mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(body)
        store.add(f"{i:032x}", "cam", root, relative, "old-run", now - (age_days - keep_days) * 86400,
                  links=[(i + 1, f"{i + 1:032x}", "start")])  # fmt: skip
        store.update(f"{i:032x}", state=state, start_ts=now - age_days * 86400, bytes=len(body))
    db = sqlite3.connect(database)  # events for `vigild clip` to find
    db.executemany("INSERT INTO events VALUES (?, ?, 'r', ?, 'cam', 'line.cross', NULL, NULL, '{}', NULL, 0)",
                   [(i + 1, f"{i + 1:032x}", now) for i in range(5)])  # fmt: skip
    db.commit()
    db.close()
    store.close()
    section = RecordingConfig.model_validate({"events": ["line.cross"], "max_size_mb": 0.62, "min_free_mb": 0})
    recording = Recording(root, database, section, lambda name: None, dict, lambda event: None, "new-run")
    recording._recover = lambda: None  # (the writing row is this run's: not a leftover to repair)
    recording.start()
    try:
        deadline = time.monotonic() + 30
        while recording.counters["expired"] < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        recording.stop()
    states = dict(sqlite3.connect(database).execute("SELECT path, state || ':' || coalesce(error, '') FROM clips"))
    assert states == {"cam/clip0.mp4": "expired:retention", "cam/clip1.mp4": "expired:size_cap",
                      "cam/clip2.mp4": "saved:", "cam/clip3.mp4": "saved:", "cam/clip4.mp4": "writing:"}  # fmt: skip
    assert sorted(p.name for p in (root / "cam").iterdir()) == ["clip2.mp4", "clip3.mp4", "clip4.mp4"]
    gone = subprocess.run([sys.executable, "-m", "vigild", "clip", "2", "-j", str(database), "-o", str(tmp_path / "x")],
                          capture_output=True, text=True, cwd=ROOT, env=daemon_env(), timeout=60)  # fmt: skip
    assert gone.returncode == 1 and "removed by retention (size_cap)" in gone.stderr
    assert sqlite3.connect(database).execute("SELECT count(*) FROM events").fetchone() == (5,), "events stay"


@pytest.mark.timeout(120)
def test_the_free_space_floor_removes_the_oldest_clips(tmp_path, small_disk):
    """Recordings on a 1 MiB tmpfs, 800 KB of clips in it, `min_free_mb` asking for more free space than is left:
    the oldest clips go until it is free; the newer stay."""
    from vigild.outputs.clip_store import ClipStore
    from vigild.outputs.journal import Journal
    from vigild.recording.manager import Recording

    database, root = tmp_path / "journal.db", small_disk / "rec"
    Journal(database).close()
    store = ClipStore(database)
    now = time.time()
    for i in range(4):
        (root / "cam").mkdir(parents=True, exist_ok=True)
        (root / f"cam/clip{i}.mp4").write_bytes(os.urandom(200_000))
        store.add(f"{i:032x}", "cam", root, f"cam/clip{i}.mp4", "old-run", now + 86400)
        store.update(f"{i:032x}", state="saved", start_ts=now - (10 - i) * 60, bytes=200_000)
    store.close()
    floor_mb = 0.45
    section = RecordingConfig.model_validate({"events": ["line.cross"], "min_free_mb": floor_mb})
    recording = Recording(root, database, section, lambda name: None, dict, lambda event: None, "new-run")
    recording.start()
    try:
        deadline = time.monotonic() + 30
        while recording.counters["expired"] < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        recording.stop()
    assert sorted(p.name for p in (root / "cam").iterdir()) == ["clip2.mp4", "clip3.mp4"]
    assert shutil.disk_usage(root).free >= floor_mb * (1 << 20)
    errors = dict(sqlite3.connect(database).execute("SELECT path, error FROM clips WHERE state = 'expired'"))
    assert errors == {"cam/clip0.mp4": "free_space", "cam/clip1.mp4": "free_space"}


@pytest.mark.e2e
@pytest.mark.timeout(400)
def test_a_line_crossing_on_the_plaza_makes_a_clip_that_plays_in_the_console(tmp_path, encoded_media):
    """The plaza footage (H.264) through Yolo-Fastest, ByteTrack and the analytics at its rate: each `line.cross`
    has a clip (found from the event), whose pictures are the source's; the console lists it and Debian's chromium
    plays it to its end with the clip's duration."""
    from test_web import chromium, console

    source = encoded_media["h264"]
    plugins = f"{yolo_fastest_yaml(0.3)}\n  - type: bytetrack\n  - type: analytics\n"
    cameras = f"  plaza:\n    source: {source}\n    lines:\n      crossing: {{points: [[250, 120], [250, 576]]}}\n"
    config = daemon_config(tmp_path, cameras, "{events: [line.cross], pre_s: 2, post_s: 3}", plugins,
                           "web:\n  listen: 127.0.0.1:0\n")  # fmt: skip
    service = Service(tmp_path, config)
    playwright, browser = chromium()
    try:
        url, token = console(service)
        saved = wait(lambda: journal_events(tmp_path, "clip.saved"), "a clip of a crossing", service, timeout=200)[0]
        crossing = next(e for e in journal_events(tmp_path, "line.cross") if e["id"] in saved["events"])
        page = browser.new_page()
        page.goto(f"{url}?token={token}")
        page.goto(f"{url}#/events")
        page.fill("#filters input[name=type]", "line.cross")  # as a user finds it among the track updates
        page.click("#filters button[type=submit]")
        row = page.locator(f"tr[data-seq='{crossing['seq']}']")
        row.wait_for(timeout=60_000)
        row.click()
        page.wait_for_selector("#clip")
        page.evaluate("() => { const v = document.querySelector('#clip'); v.muted = true; v.playbackRate = 4; v.play(); }")
        page.wait_for_function("() => document.querySelector('#clip').ended", timeout=60_000)
        played = page.evaluate("() => document.querySelector('#clip').duration")
    finally:
        browser.close()
        playwright.stop()
        code, _ = service.stop()
    assert code == 0, service.log_text()[-2000:]
    assert abs(played - saved["duration_s"]) < 0.25, (played, saved)
    clip = pictures(tmp_path / "recordings" / saved["path"], "h264")
    position_in(pictures(source, "h264"), clip)
    assert abs(len(clip) / FPS - saved["duration_s"]) < 0.15


def test_an_order_whose_path_leaves_the_root_is_dropped_with_a_clear_reason(tmp_path):
    from vigild.capture.recorder import inside

    root = tmp_path / "recordings"
    root.mkdir()
    for bad in ("../x.mp4", "/etc/x.mp4", "cam/../../x.mp4", ""):
        with pytest.raises(ValueError, match="not a path below the recordings root"):
            inside(root, bad)
    assert inside(root, "cam/2026-01-01/x.mp4") == (root / "cam/2026-01-01/x.mp4").resolve()

"""What `source:` strings mean, and the config errors for the ones that mean nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from vigild.config import ConfigError, load_config
from vigild.sources import PatternSpec, SourceKind, parse_source, redact, with_credentials


@pytest.mark.parametrize(
    ("source", "kind", "uri", "display"),
    [
        ("/srv/clips/a.mp4", SourceKind.FILE, "/srv/clips/a.mp4", "/srv/clips/a.mp4"),
        ("clips/a.mp4", SourceKind.FILE, "/etc/vigild/clips/a.mp4", "clips/a.mp4"),
        ("file:///srv/a.mp4", SourceKind.FILE, "/srv/a.mp4", "file:///srv/a.mp4"),
        ("rtsp://10.0.0.5:554/stream1", SourceKind.RTSP, "rtsp://10.0.0.5:554/stream1", "rtsp://10.0.0.5:554/stream1"),
        ("rtsp://admin:pw@cam/x", SourceKind.RTSP, "rtsp://admin:pw@cam/x", "rtsp://admin:***@cam/x"),
        ("rtsps://cam.example/x", SourceKind.RTSP, "rtsps://cam.example/x", "rtsps://cam.example/x"),
        ("http://cam/mjpeg", SourceKind.HTTP, "http://cam/mjpeg", "http://cam/mjpeg"),
        ("https://cdn/live.m3u8", SourceKind.HTTP, "https://cdn/live.m3u8", "https://cdn/live.m3u8"),
        ("/dev/video2", SourceKind.V4L2, "/dev/video2", "/dev/video2"),
        ("0", SourceKind.V4L2, "/dev/video0", "/dev/video0"),
        ("test://", SourceKind.TEST, "test://", "test://"),
        ("file:///srv/my%20clip.mp4", SourceKind.FILE, "/srv/my clip.mp4", "file:///srv/my%20clip.mp4"),
        ("/dev/v4l/by-id/usb-Cam-video-index0", SourceKind.V4L2, "/dev/v4l/by-id/usb-Cam-video-index0", "/dev/v4l/by-id/usb-Cam-video-index0"),
        ("rtsp://cam/live?user=a&pwd=secret", SourceKind.RTSP, "rtsp://cam/live?user=a&pwd=secret", "rtsp://cam/live?user=a&pwd=***"),
        ("rtsp://u:p@[fe80::1]:554/x", SourceKind.RTSP, "rtsp://u:p@[fe80::1]:554/x", "rtsp://u:***@[fe80::1]:554/x"),
    ],
)
def test_source_kinds(source, kind, uri, display):
    spec = parse_source(source, base_dir=Path("/etc/vigild"))
    assert (spec.kind, spec.uri, spec.display) == (kind, uri, display)
    assert spec.is_live is (kind is not SourceKind.FILE)


def test_test_pattern_parameters():
    assert parse_source("test://smpte?width=320&height=240&fps=12.5").test == PatternSpec("smpte", 320, 240, 12.5)
    assert parse_source("test://").test == PatternSpec("balls", 640, 480, 25.0)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("", "empty source"),
        ("rtmp://cam/live", "unknown source scheme 'rtmp://'"),
        ("srt://cam:9000", "unknown source scheme 'srt://'"),
        ("rtsp:/cam/stream", "malformed URI 'rtsp:/cam/stream'; expected rtsp://host[:port]/path"),
        ("rtsp:///stream", "no host"),
        ("rtsp://cam:99999/stream", "the port is not a number from 1 to 65535"),
        ("rtsp://cam:abc/stream", "the port is not a number from 1 to 65535"),
        ("rtsp://cam/my stream", "contains whitespace"),
        ("http://user:secret@:80/x", "malformed URI 'http://user:***@:80/x'"),
        ("file://host/a.mp4", "malformed file URI"),
        ("file:clip.mp4", "malformed file URI"),
        ("/dev/sda", "not a video device"),
        ("test://plaid", "unknown test pattern 'plaid'"),
        ("test://balls?width=wide", "expected a number"),
        ("test://balls?size=3", "unknown test:// parameter 'size'"),
        ("test://balls?fps=0", "out of range"),
    ],
)
def test_bad_sources_say_what_was_expected(source, message):
    with pytest.raises(ValueError) as info:
        parse_source(source)
    assert message in str(info.value)
    assert "secret" not in str(info.value)


def test_credentials_are_masked_for_display_and_encoded_for_use():
    assert redact("rtsp://u:p@cam:554/x") == "rtsp://u:***@cam:554/x"
    assert redact("rtsp://cam/x") == "rtsp://cam/x"
    assert redact("rtsp://u:p@cam:99999/x") == "rtsp://u:***@cam:99999/x"  # never raises, even on a bad port
    # error texts from back ends quote the URI they opened; a configured password is masked wherever it appears
    error = "souphttpsrc: Unauthorized (401), URL: http://admin:hunter2@10.0.0.5/mjpeg?password=hunter2"
    assert "hunter2" not in redact(error)
    assert redact("login failed for s3cr&t", ("s3cr&t",)) == "login failed for ***"
    assert with_credentials("rtsp://[::1]:554/x", "u", "p") == "rtsp://u:p@[::1]:554/x"
    assert with_credentials("rtsp://cam:554/x", "ad min", "p@ss:w") == "rtsp://ad%20min:p%40ss%3Aw@cam:554/x"
    assert with_credentials("rtsp://u:p@cam/x", None, None) == "rtsp://u:p@cam/x"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("ftp://cam/x", ":3: cameras.door.source: unknown source scheme 'ftp://'"),
        ("rtsp://cam:70000/x", ":3: cameras.door.source: malformed URI 'rtsp://cam:70000/x': the port"),
    ],
)
def test_bad_source_is_a_config_error_with_file_line_and_camera(tmp_path, source, expected):
    path = tmp_path / "vigild.yaml"
    path.write_text(f"cameras:\n  door:\n    source: {source}\n  yard:\n    source: test://\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert str(info.value).startswith(f"{path}{expected}"), str(info.value)
    assert "yard" not in str(info.value)  # only the bad camera is named


def test_config_errors_never_show_a_password(tmp_path):
    path = tmp_path / "vigild.yaml"
    path.write_text("cameras:\n  door:\n    source: rtsp://admin:${PW}@cam:99999/x\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={"PW": "hunter2"})
    assert "the port is not a number" in str(info.value) and "hunter2" not in str(info.value), str(info.value)


def test_test_pattern_needs_gstreamer(tmp_path):
    path = tmp_path / "vigild.yaml"
    path.write_text("cameras:\n  demo:\n    source: test://\n    backend: opencv\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert "cameras.demo" in str(info.value) and "test:// patterns need the GStreamer back end" in str(info.value)


def test_relative_file_sources_are_relative_to_the_config_file(tmp_path):
    (tmp_path / "clips").mkdir()
    path = tmp_path / "vigild.yaml"
    path.write_text("cameras:\n  door:\n    source: clips/door.mp4\n")
    assert load_config(path, environ={}).source("door").uri == str(tmp_path / "clips" / "door.mp4")

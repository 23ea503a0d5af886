"""What `source:` strings mean, and the config errors for the ones that mean nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import VTEST, daemon_env

from vigild.capture.camera import make_reader
from vigild.config.loading import ConfigError, load_config
from vigild.config.sources import PatternSpec, SourceKind, parse_source, redact, with_credentials


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
        ("/dev/v4l/by-id/../../../etc/passwd", "not a video device"),  # a device name, never a way to any file
        ("/dev/v4l/by-path/..", "not a video device"),
        ("/dev/v4l/by-id/a/b", "not a video device"),
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


@pytest.mark.parametrize(
    ("source", "display"),
    [
        # a password holding `@` (unencoded): masked up to the last `@` of the authority
        ("rtsp://admin:p@ss@host/x", "rtsp://admin:***@host/x"),
        ("rtsp://admin:p@s@s@host:554/x", "rtsp://admin:***@host:554/x"),
        ("rtsp://admin:pa:ss@host/x", "rtsp://admin:***@host/x"),
        ("http://u:p%40ss@cam/mjpeg", "http://u:***@cam/mjpeg"),
        ("rtsp://admin@cam/x", "rtsp://admin@cam/x"),  # a user and no password: nothing to hide
        # secret query and `;` parameters, by any name that says so, in any case
        ("rtsp://cam/x?pw=Hunter2", "rtsp://cam/x?pw=***"),
        ("rtsp://cam/x?user=a&access_token=Hunter2", "rtsp://cam/x?user=a&access_token=***"),
        ("https://cdn/live.m3u8?api_key=Hunter2&apikey=Hunter2", "https://cdn/live.m3u8?api_key=***&apikey=***"),
        ("https://cdn/x?sig=Hunter2&signature=Hunter2&X-Amz-Signature=Hunter2", "https://cdn/x?sig=***&signature=***&X-Amz-Signature=***"),
        ("rtsp://cam/x?secret=Hunter2&credentials=Hunter2&credential=Hunter2", "rtsp://cam/x?secret=***&credentials=***&credential=***"),
        ("rtsp://cam/x?session=Hunter2&SessionID=Hunter2&passphrase=Hunter2", "rtsp://cam/x?session=***&SessionID=***&passphrase=***"),
        ("rtsp://cam/x?PASSWORD=Hunter2&Token=Hunter2&AUTH=Hunter2", "rtsp://cam/x?PASSWORD=***&Token=***&AUTH=***"),
        ("rtsp://cam/x;password=Hunter2;channel=1", "rtsp://cam/x;password=***;channel=1"),
        ("rtsp://cam/x?channel=1;auth_key=Hunter2", "rtsp://cam/x?channel=1;auth_key=***"),
        ("rtsp://cam/x?pass%77ord=Hunter2", "rtsp://cam/x?pass%77ord=***"),  # a percent-encoded name is still a name
        ("https://cdn/x#access_token=Hunter2", "https://cdn/x#access_token=***"),
        ("rtsp://cam/x?channel=1&subtype=0", "rtsp://cam/x?channel=1&subtype=0"),  # harmless names are shown
    ],
)
def test_display_masks_every_password_and_secret_parameter(source, display):
    assert parse_source(source).display == display
    assert redact(source) == display  # the same for any text (an error, a log line) that quotes the URI


@pytest.mark.parametrize("password", ["pa/ss", "pa?ss", "pa#ss", "pa ss", "p@s/s", "54/ss"])
def test_malformed_uri_errors_never_echo_a_password(password):
    """A `/`, `?`, `#` or space in a password (not percent-encoded) breaks the URI; the error saying so, and any text
    quoting the URI, must not show the password (or part of it)."""
    source = f"rtsp://admin:{password}@host/x"
    try:
        shown = parse_source(source).display  # "54/ss": host `admin`, port 54, path `/ss@host/x`: valid, but masked
    except ValueError as exc:
        shown = str(exc)
        assert shown.startswith("malformed URI 'rtsp://admin:***@host/x'"), shown
    assert "admin:***@host/x" in shown, shown
    assert "ss" not in shown.replace("rtsp", ""), shown
    if " " not in password:  # (such a source is refused at load, so no back end ever quotes it)
        assert "ss" not in redact(f"could not open {source}: 401").replace("rtsp", "")


def test_other_malformed_sources_never_echo_a_password():
    for source in ("rtsp:/admin:Hunter2@host", "rtsp:admin:Hunter2@host", "file://u:Hunter2@host/a.mp4", "test://u:Hunter2@balls"):
        with pytest.raises(ValueError) as info:
            parse_source(source)
        assert "Hunter2" not in str(info.value), str(info.value)


def test_vigild_check_shows_sources_masked(tmp_path):
    path = tmp_path / "vigild.yaml"
    path.write_text(
        "cameras:\n"
        "  door:\n    source: rtsp://admin:p@ss@door.example:554/x?channel=1&api_key=K3yZ\n"
        "  yard:\n    source: rtsp://yard.example/live;password=Yard5ecret\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "vigild", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=daemon_env(),
    )
    assert result.returncode == 0, result.stderr
    assert "  door: rtsp rtsp://admin:***@door.example:554/x?channel=1&api_key=*** via" in result.stdout, result.stdout
    assert "  yard: rtsp rtsp://yard.example/live;password=*** via" in result.stdout, result.stdout
    assert "K3yZ" not in result.stdout and "Yard5ecret" not in result.stdout and "@ss" not in result.stdout


def test_opencv_opens_a_file_camera_that_has_credentials(tmp_path):
    """`username`/`password` are for streams: the OpenCV back end must not write them into a file path (it did,
    and such a camera never opened). Read through the back end the daemon uses, on a real file."""
    path = tmp_path / "vigild.yaml"
    path.write_text(
        f"cameras:\n  door:\n    source: {VTEST}\n    backend: opencv\n    realtime: false\n"
        "    username: viewer\n    password: s3cret\n"
    )
    config = load_config(path, environ={})
    reader = make_reader("door", config.settings.cameras["door"], config.source("door"), "opencv")
    try:
        reader.open()
        frame = reader.read(timeout=10)
    finally:
        reader.close()
    assert frame is not None and frame.image.shape == (576, 768, 3)


def test_redact_masks_every_uri_in_a_text():
    text = "tried rtsp://a:Pw1@cam1/x,rtsp://b:Pw2@cam2/x then http://c:Pw3@cam3/y?token=Pw4 (rtsp://[::1]:554/z)"
    shown = redact(text)
    assert not any(f"Pw{i}" in shown for i in range(1, 5)), shown
    assert shown.startswith("tried rtsp://a:***@cam2/x then http://c:***@cam3/y?token=*** (rtsp://[::1]:554/z)"), shown

"""A network camera never reads a local file: an HLS playlist served over HTTP that names a `file://` segment is
refused by both capture back ends, with one error whatever the file is (or whether it exists), and no frame.

Real parts: a playlist served by an HTTP server on loopback, real MPEG-TS segments, the daemon's capture threads.
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from streams import run_camera

from vigild.capture.gst_pipeline import LOCAL_SOURCE_REFUSED, reads_local
from vigild.capture.reader_opencv import NETWORK_PROTOCOLS, OPTIONS_VARIABLE, network_options
from vigild.config.loading import CameraConfig, ReconnectConfig

BACKENDS = ["gstreamer", "opencv"]
RETRY = ReconnectConfig(initial_delay=0.05, max_delay=0.1)


@pytest.fixture(scope="module")
def segment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two seconds of H.264 in MPEG-TS, 160x120 at 10 fps."""
    path = tmp_path_factory.mktemp("segment") / "seg.ts"
    subprocess.run(
        [
            "gst-launch-1.0",
            "-q",
            *[
                "videotestsrc",
                "num-buffers=20",
                "!",
                "video/x-raw,width=160,height=120,framerate=10/1",
                "!",
                "x264enc",
                "speed-preset=ultrafast",
                "key-int-max=10",
                "!",
                "mpegtsmux",
                "!",
                "filesink",
            ],
            f"location={path}",
        ],
        check=True,
        timeout=60,
    )
    return path


class PlaylistServer:
    """Serves `/p.m3u8`, one finished playlist whose only segment is `self.segment` (set by the test), and the real
    segment at `/seg.ts`."""

    def __init__(self, segment: Path):
        self.segment = "seg.ts"
        self.requests: list[str] = []
        data, server = segment.read_bytes(), self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append(self.path)
                if self.path == "/p.m3u8":
                    body, kind = server.playlist().encode(), "application/vnd.apple.mpegurl"
                elif self.path == "/seg.ts":
                    body, kind = data, "video/mp2t"
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/p.m3u8"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def playlist(self) -> str:
        return (
            "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:2\n#EXT-X-MEDIA-SEQUENCE:0\n"
            f"#EXTINF:2.0,\n{self.segment}\n#EXT-X-ENDLIST\n"
        )

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def server(segment: Path) -> Iterator[PlaylistServer]:
    served = PlaylistServer(segment)
    yield served
    served.close()


def local_files(segment: Path, tmp_path: Path) -> dict[str, Path]:
    """A real video segment, a file that does not exist, and a file that is not video."""
    text = tmp_path / "notes.ts"
    text.write_text("not a video\n" * 100)
    return {"video": segment, "missing": tmp_path / "missing.ts", "text": text}


def failed_or_framed(frames: list, _notices: list, capture) -> bool:  # type: ignore[type-arg]
    return bool(frames) or capture.stats.last_error is not None


def network_camera(server: PlaylistServer, backend: str) -> tuple[int, str | None]:
    """Run a camera on the playlist until it fails or delivers a frame: (frames, last_error)."""
    config = CameraConfig(backend=backend, source=server.url, reconnect=RETRY, stall_timeout=5)
    frames, _notices, capture = run_camera(config, failed_or_framed, timeout=30)
    return len(frames), capture.stats.last_error


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_http_playlist_naming_a_local_file_is_refused_alike_for_every_file(server, segment, tmp_path, backend):
    """GStreamer's HLS demuxer opened `file://` segments with filesrc (frames reached snapshots; a missing and a
    non-video file gave different errors, telling which files exist). Now: no frame, one error for all three."""
    errors = {}
    for name, path in local_files(segment, tmp_path).items():
        server.segment = path.as_uri()
        frames, errors[name] = network_camera(server, backend)
        assert frames == 0, f"{backend}: a frame of the local {name} file reached the camera"
    assert len(set(errors.values())) == 1, errors
    if backend == "gstreamer":
        assert errors["video"] == LOCAL_SOURCE_REFUSED
    else:  # FFmpeg's own refusal says only that the stream cannot be opened: the same for every file
        assert errors["video"] == f"OpenCV cannot open {server.url}"
    # the guard is not a broken HLS: the same playlist naming the segment over HTTP plays
    server.segment = "seg.ts"
    frames, error = network_camera(server, backend)
    assert frames > 0, error
    assert "/seg.ts" in server.requests


def test_opencv_refuses_local_files_even_when_the_users_ffmpeg_options_allow_them(
    server, segment, monkeypatch, tmp_path
):
    """The user's own OPENCV_FFMPEG_CAPTURE_OPTIONS may allow `file` (it did: FFmpeg then read the segment); a
    network camera's whitelist replaces theirs, and their other options and the variable itself are kept."""
    monkeypatch.setenv(OPTIONS_VARIABLE, "protocol_whitelist;file,http,tcp|rtsp_transport;tcp")
    server.segment = segment.as_uri()
    frames, error = network_camera(server, "opencv")
    assert frames == 0 and error == f"OpenCV cannot open {server.url}"
    import os

    assert os.environ[OPTIONS_VARIABLE] == "protocol_whitelist;file,http,tcp|rtsp_transport;tcp"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_configured_file_still_plays_after_a_refused_network_camera(server, segment, backend):
    """The guard is for network cameras only; a file in the config plays, in the same process, right after one."""
    server.segment = segment.as_uri()
    assert network_camera(server, backend)[0] == 0
    config = CameraConfig(backend=backend, source=str(segment), realtime=False)
    frames, _notices, capture = run_camera(config, failed_or_framed, timeout=30)
    assert frames and frames[0].image.shape == (120, 160, 3), capture.stats.last_error


def test_network_options_keep_the_users_and_replace_their_whitelist():
    assert network_options(None) == f"rtsp_flags;prefer_tcp|protocol_whitelist;{NETWORK_PROTOCOLS}"
    assert network_options("rtsp_transport;tcp|protocol_whitelist;file") == (
        f"rtsp_transport;tcp|protocol_whitelist;{NETWORK_PROTOCOLS}"
    )
    assert "file" not in NETWORK_PROTOCOLS.split(",")


@pytest.mark.parametrize(
    ("klass", "uri", "protocols", "local"),
    [
        ("Source/File", "file:///etc/passwd", ("file",), True),
        ("Source/File", None, ("file",), True),  # filesrc before its location is set
        ("Source/File", None, ("fd",), True),  # fdsrc: any descriptor the daemon holds
        ("Source/Video", "v4l2:///dev/video0", ("v4l2",), True),
        ("Source/Network", "http://cdn/seg.ts", ("http", "https"), False),
        ("Source/Network", "udp://0.0.0.0:5000", ("udp",), False),  # rtspsrc's RTP sockets
        ("Source", "data:video/mp2t;base64,AAAA", ("data",), False),
        ("Generic", None, (), False),  # queue, typefind
    ],
)
def test_which_plugged_elements_read_this_machine(klass, uri, protocols, local):
    assert reads_local(klass, uri, protocols) is local

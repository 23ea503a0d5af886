"""A network camera never reads a local file: an HLS playlist served over HTTP that names a `file://` segment, a
`file://` variant playlist or a `file://` decryption key is refused by both capture back ends, with one error whatever
the file is (or whether it exists), and no frame.

Real parts: a playlist served by an HTTP server on loopback, real MPEG-TS segments, the daemon's capture threads.
"""

from __future__ import annotations

import errno
import os
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from streams import run_camera

from vigild.capture.gst_lockdown import launch, lock_down
from vigild.capture.gst_pipeline import LOCAL_SOURCE_REFUSED, names_local_uri, reads_local
from vigild.capture.reader_opencv import NETWORK_PROTOCOLS, OPTIONS_VARIABLE, network_options
from vigild.config.loading import CameraConfig, ReconnectConfig
from vigild.gstreamer import gst_modules

BACKENDS = ["gstreamer", "opencv"]
RETRY = ReconnectConfig(initial_delay=0.05, max_delay=0.1)
FAILED_SEGMENTS = "Fragment downloading has failed consecutive times"


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
    """Serves `/p.m3u8`, one finished playlist whose only segment is `self.segment` (set by the test), the real
    segment at `/seg.ts`, and whatever the test puts in `self.files` (path -> text)."""

    def __init__(self, segment: Path):
        self.segment = "seg.ts"
        self.files: dict[str, str] = {}
        self.requests: list[str] = []
        data, server = segment.read_bytes(), self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append(self.path)
                if self.path == "/p.m3u8":
                    body, kind = server.playlist().encode(), "application/vnd.apple.mpegurl"
                elif self.path == "/seg.ts":
                    body, kind = data, "video/mp2t"
                elif self.path in server.files:
                    body, kind = server.files[self.path].encode(), "application/vnd.apple.mpegurl"
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

    def playlist(self, key: str | None = None) -> str:
        """The media playlist; `key`: the URI of an AES-128 key for its segment."""
        return (
            "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:2\n#EXT-X-MEDIA-SEQUENCE:0\n"
            + (f'#EXT-X-KEY:METHOD=AES-128,URI="{key}"\n' if key else "")
            + f"#EXTINF:2.0,\n{self.segment}\n#EXT-X-ENDLIST\n"
        )

    def master(self, variant: str) -> str:
        """Serve `/m.m3u8`, a master playlist whose only variant is `variant`; returns its URL."""
        self.files["/m.m3u8"] = f"#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=100000,RESOLUTION=160x120\n{variant}\n"
        return self.url.replace("/p.m3u8", "/m.m3u8")

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


def network_camera(server: PlaylistServer, backend: str, url: str | None = None) -> tuple[int, str | None]:
    """Run a camera on the playlist (or `url`) until it fails or delivers a frame: (frames, last_error)."""
    config = CameraConfig(backend=backend, source=url or server.url, reconnect=RETRY, stall_timeout=5)
    frames, _notices, capture = run_camera(config, failed_or_framed, timeout=30)
    return len(frames), capture.stats.last_error


def opened_for_reading(fifo: Path) -> bool:
    """Whether anyone opened `fifo` to read it. A reader's `open` waits for a writer: while one waits (or reads), a
    non-blocking open for writing succeeds (and lets it go on, to an empty file); with no reader it fails, ENXIO."""
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            return False
        raise
    os.close(fd)
    return True


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["variant", "key"])
def test_a_master_playlist_naming_a_local_variant_or_key_never_opens_it(server, tmp_path, backend, where):
    """GStreamer's HLS demuxer fetches variant playlists and keys with a downloader of its own, outside the pipeline:
    it opened a `file://` variant or key (the check on plugged elements never saw it). The "local file" is a FIFO, so
    an open shows (a reader waits in it for a writer); the camera fails and nobody opened it, during the run or
    after."""
    fifo = tmp_path / "local.m3u8"
    os.mkfifo(fifo)
    if where == "variant":
        url = server.master(fifo.as_uri())
    else:
        server.files["/v.m3u8"] = server.playlist(key=fifo.as_uri())
        url = server.master("v.m3u8")
    opened = []

    def opened_failed_or_framed(frames: list, notices: list, capture) -> bool:  # type: ignore[type-arg]
        if opened_for_reading(fifo):
            opened.append(True)
        return bool(opened) or failed_or_framed(frames, notices, capture)

    config = CameraConfig(backend=backend, source=url, reconnect=RETRY, stall_timeout=5)
    frames, _notices, capture = run_camera(config, opened_failed_or_framed, timeout=30)
    assert not opened and not opened_for_reading(fifo), f"{backend} opened the local {where}"
    assert not frames and capture.stats.last_error is not None
    assert "/m.m3u8" in server.requests
    if backend == "gstreamer" and where == "variant":
        assert capture.stats.last_error == LOCAL_SOURCE_REFUSED


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_master_playlist_over_http_plays(server, backend):
    """The control for the test above: the same master playlist naming its variant over HTTP plays."""
    server.files["/v.m3u8"] = server.playlist()
    frames, error = network_camera(server, backend, server.master("v.m3u8"))
    assert frames > 0, error
    assert server.requests[:3] == ["/m.m3u8", "/v.m3u8", "/seg.ts"]


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
    if backend == "gstreamer":  # the demuxer finds no source for file:// in this process: it gives up downloading
        assert errors["video"] in (LOCAL_SOURCE_REFUSED, f"hlsdemux: Couldn't download fragments ({FAILED_SEGMENTS})")
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


def test_this_process_has_no_local_source_but_the_daemons_own_files_still_play(segment):
    """After the lock-down (every GStreamer reader's first step), no URI, element name or later plugin load gives a
    local source; a description the daemon writes for a configured file still builds and plays (a kept factory)."""
    gst = gst_modules()[0]
    lock_down()
    for uri in ("file:///etc/hostname", "fd://0", "resource:///x", "multifile:///x", "v4l2:///dev/video0"):
        with pytest.raises(Exception, match="No URI handler"):
            gst.Element.make_from_uri(gst.URIType.SRC, uri, None)
    # loading a plugin for another of its elements would register its local source again, if it had not been loaded
    for sibling in ("giostreamsrc", "multifilesink", "splitmuxsink", "fakesink"):
        gst.ElementFactory.make(sibling)
    assert lock_down() == []
    for name in ("filesrc", "giosrc", "fdsrc", "multifilesrc", "splitmuxsrc", "v4l2src", "appsrc"):
        assert gst.ElementFactory.find(name) is None, name
    with pytest.raises(Exception, match="no element"):
        gst.parse_launch(f'filesrc location="{segment}" ! fakesink')
    for name in ("souphttpsrc", "rtspsrc", "udpsrc", "dataurisrc", "uridecodebin"):  # network sources stay
        assert gst.ElementFactory.find(name) is not None, name
    pipeline = launch(f'filesrc location="{segment}" ! decodebin ! fakesink name=sink signal-handoffs=true')
    frames = []
    pipeline.get_by_name("sink").connect("handoff", lambda *_: frames.append(1))
    pipeline.set_state(gst.State.PLAYING)
    message = pipeline.get_bus().timed_pop_filtered(30 * gst.SECOND, gst.MessageType.EOS | gst.MessageType.ERROR)
    pipeline.set_state(gst.State.NULL)
    assert message is not None and message.type == gst.MessageType.EOS and len(frames) == 20


def test_an_error_naming_a_local_uri_is_told_from_a_network_one():
    assert names_local_uri("Could not fetch media playlist: Failed to download 'file:///srv/v.m3u8'")
    assert names_local_uri("Missing plugin to handle URI: 'fd://3'")
    assert not names_local_uri("Failed to download 'http://cdn/v.m3u8' (../ext/hls/gsthlsdemux.c(811): /GstPipeline:p)")

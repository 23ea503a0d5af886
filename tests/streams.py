"""Real stream servers on loopback for the capture tests: RTSP (GstRtspServer, its own process), HTTP MJPEG,
and a server that accepts connections and then says nothing. Also the H.264/H.265 files they serve, encoded
once per test session from the shared vtest.avi."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2

from vigild.capture.camera import CameraCapture
from vigild.capture.exchange import FrameExchange, Notice
from vigild.config.loading import CameraConfig
from vigild.config.sources import parse_source
from vigild.frame import Frame

ROOT = Path(__file__).resolve().parent.parent
RTSP_SERVER = ROOT / "tests" / "servers" / "rtsp_server.py"


def run_camera(
    config: CameraConfig,
    until: Callable[[list[Frame], list[Notice], CameraCapture], bool],
    timeout: float = 30.0,
) -> tuple[list[Frame], list[Notice], CameraCapture]:
    """Run one camera until `until(frames, notices, capture)` holds (or `timeout`), then stop it."""
    exchange = FrameExchange()
    capture = CameraCapture("cam", config, parse_source(config.source), exchange)
    capture.start()
    frames: list[Frame] = []
    notices: list[Notice] = []
    deadline = time.monotonic() + timeout
    try:
        while not until(frames, notices, capture) and time.monotonic() < deadline:
            taken = exchange.take(8, 0, 1, 0.1)
            frames.extend(taken.frames)
            notices.extend(taken.opened + taken.closed)
    finally:
        capture.stop()
        exchange.close()
        capture.join(10)
    assert not capture.is_alive(), "the capture thread did not stop"
    return frames, notices, capture


def frames_at_least(n: int) -> Callable[[list[Frame], list[Notice], CameraCapture], bool]:
    return lambda frames, _notices, _capture: len(frames) >= n


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def encode(source: Path, out: Path, codec: str, frames: int, size: tuple[int, int] | None = None) -> Path:
    """Re-encode the first `frames` frames of `source` to an MP4 with x264enc (`h264`) or x265enc (`h265`)."""
    encoder = {
        "h264": "x264enc speed-preset=ultrafast tune=zerolatency key-int-max=10 bitrate=2000 ! h264parse",
        "h265": "x265enc speed-preset=ultrafast tune=zerolatency key-int-max=10 bitrate=2000 ! h265parse",
    }[codec]
    scale = f"videoscale ! video/x-raw,width={size[0]},height={size[1]} ! " if size else ""
    subprocess.run(
        [
            "gst-launch-1.0",
            "-q",
            *f'filesrc location="{source}" ! decodebin ! identity eos-after={frames} ! videoconvert ! {scale}'
            f'{encoder} ! mp4mux ! filesink location="{out}"'.split(),
        ],
        check=True,
        timeout=300,
    )
    return out


def encode_size_change(
    source: Path, out: Path, sizes: tuple[tuple[int, int], ...], frames: int
) -> tuple[Path, list[int]]:
    """An H.264 byte stream whose frame size changes: about `frames` frames of `source` at each of `sizes` in turn,
    each part a complete stream (new SPS/PPS and a key frame), concatenated, as a camera does when its resolution is
    changed while it streams. Raw byte stream (`.h264`): no container to declare one size for the whole file.
    Returns the file and how many frames each part holds (counted by decoding it: `identity eos-after=N` lets N or
    N - 1 frames through, run by run)."""
    parts, counts = [], []
    for index, (width, height) in enumerate(sizes):
        part = out.with_name(f"{out.stem}.part{index}.h264")
        subprocess.run(
            [
                "gst-launch-1.0",
                "-q",
                *f'filesrc location="{source}" ! decodebin ! identity eos-after={frames} ! videoconvert ! videoscale '
                f"! video/x-raw,width={width},height={height},pixel-aspect-ratio=1/1 ! x264enc speed-preset=ultrafast "
                f'key-int-max=10 ! video/x-h264,stream-format=byte-stream ! filesink location="{part}"'.split(),
            ],
            check=True,
            timeout=300,
        )
        parts.append(part.read_bytes())
        counts.append(count_frames(part))
        part.unlink()
    out.write_bytes(b"".join(parts))
    return out, counts


def count_frames(path: Path) -> int:
    """Frames in a video file, by decoding it with OpenCV (independent of the reader under test)."""
    capture = cv2.VideoCapture(str(path))
    count = 0
    while capture.grab():
        count += 1
    capture.release()
    return count


class RtspServer:
    """tests/servers/rtsp_server.py as a process, so a test can kill it like a camera losing power."""

    def __init__(self, mounts: dict[str, Path], port: int | None = None, auth: str | None = None):
        self.port = port or free_port()
        self.mounts = mounts
        self.auth = auth
        self.process: subprocess.Popen[str] | None = None

    def url(self, mount: str, userinfo: str = "") -> str:
        return f"rtsp://{userinfo + '@' if userinfo else ''}127.0.0.1:{self.port}{mount}"

    def start(self) -> RtspServer:
        args = [sys.executable, str(RTSP_SERVER), "--port", str(self.port)]
        for mount, path in self.mounts.items():
            args += ["--mount", f"{mount}={path}"]
        if self.auth:
            args += ["--auth", self.auth]
        deadline = time.monotonic() + 20
        while True:  # a port just freed by a killed server can take a moment to be bindable again
            self.process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            assert self.process.stdout is not None
            if self.process.stdout.readline().strip() == "ready":
                return self
            self.process.wait()
            if time.monotonic() > deadline:
                raise RuntimeError(f"RTSP server did not start: {self.process.stderr.read() if self.process.stderr else ''}")
            time.sleep(0.2)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None


class SilentServer:
    """Accepts TCP connections and never answers: a camera that hangs after the handshake."""

    def __init__(self) -> None:
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(16)
        self.port = int(self.socket.getsockname()[1])
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return
            self.accepted.append(connection)

    def close(self) -> None:
        self.socket.close()
        for connection in self.accepted:
            connection.close()


class MjpegServer:
    """HTTP `multipart/x-mixed-replace` JPEG stream of vtest.avi at its own 10 fps, like an IP camera's /mjpeg."""

    def __init__(self, source: Path, frames: int = 100, fps: float = 10.0):
        capture = cv2.VideoCapture(str(source))
        self.jpegs: list[bytes] = []
        while len(self.jpegs) < frames:
            ok, image = capture.read()
            if not ok:
                break
            self.jpegs.append(cv2.imencode(".jpg", image)[1].tobytes())
        capture.release()
        self.size = (int(image.shape[1]), int(image.shape[0]))
        jpegs, interval = self.jpegs, 1.0 / fps

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path != "/mjpeg":
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                try:
                    index = 0
                    while True:
                        jpeg = jpegs[index % len(jpegs)]
                        self.wfile.write(
                            b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: "
                            + str(len(jpeg)).encode()
                            + b"\r\n\r\n"
                            + jpeg
                            + b"\r\n"
                        )
                        index += 1
                        time.sleep(interval)
                except (BrokenPipeError, ConnectionResetError):
                    return

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/mjpeg"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def cut_hls(h264_mp4: Path, folder: Path, timeout: float = 60.0) -> Path:
    """Cut an H.264 MP4 into MPEG-TS segments and a finished playlist (`live.m3u8`) with hlssink2, in this process.

    Not `gst-launch-1.0 … hlssink2`: with GStreamer 1.22 that command sometimes never exits (16 of 200 runs on an
    idle machine hung). hlssink2's inner bins post their end of stream and the playlist is complete
    (`#EXT-X-ENDLIST`), but the top-level pipeline never posts its own EOS, so gst-launch waits forever with every
    streaming thread idle. Here the pipeline forwards its children's messages (`message-forward`), and the EOS of
    the hlssink2 element itself ends the wait, whether or not the pipeline's aggregated EOS follows.
    """
    from vigild.capture.gst_lockdown import launch  # no filesrc by name in this process once a reader ran
    from vigild.gstreamer import gst_modules

    gst = gst_modules()[0]
    playlist = folder / "live.m3u8"
    pipeline = launch(
        f'filesrc location="{h264_mp4}" ! qtdemux ! h264parse ! hlssink2 name=hls target-duration=2 '
        f'playlist-length=0 max-files=0 location="{folder}/segment%05d.ts" playlist-location="{playlist}"'
    )
    pipeline.set_property("message-forward", True)
    bus = pipeline.get_bus()
    wanted = gst.MessageType.EOS | gst.MessageType.ERROR | gst.MessageType.ELEMENT
    deadline = time.monotonic() + timeout
    try:
        if pipeline.set_state(gst.State.PLAYING) == gst.StateChangeReturn.FAILURE:
            raise RuntimeError("hlssink2 pipeline refused to start")
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"hlssink2 did not finish {playlist} within {timeout:g} s")
            message = bus.timed_pop_filtered(int(min(remaining, 1.0) * gst.SECOND), wanted)
            if message is None:
                continue
            if message.type == gst.MessageType.ERROR:
                error, debug = message.parse_error()
                raise RuntimeError(f"hlssink2 pipeline failed: {error.message} ({debug})")
            if message.type == gst.MessageType.EOS:
                break
            structure = message.get_structure()
            if structure is not None and structure.get_name() == "GstBinForwarded":
                inner = structure.get_value("message")
                if inner.type == gst.MessageType.EOS and inner.src.get_name() == "hls":
                    break
    finally:
        pipeline.set_state(gst.State.NULL)
    if "#EXT-X-ENDLIST" not in playlist.read_text():
        raise RuntimeError(f"hlssink2 ended without finishing {playlist}")
    return playlist


class HlsServer:
    """An HLS stream (playlist + MPEG-TS segments cut by GStreamer's hlssink2) served over HTTP from a folder."""

    def __init__(self, h264_mp4: Path, folder: Path):
        from functools import partial
        from http.server import SimpleHTTPRequestHandler

        folder.mkdir(parents=True, exist_ok=True)
        cut_hls(h264_mp4, folder)

        class Quiet(SimpleHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(folder)))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/live.m3u8"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

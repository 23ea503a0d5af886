"""The control socket: JSON commands over ZeroMQ, answered on their own thread.

A ROUTER socket, so that any client shape works (REQ with its empty delimiter frame, or DEALER without one) and
nothing a client sends can wedge it: every request gets exactly one reply, `{"ok": true, "result": ...}` or
`{"ok": false, "error": {"code": ..., "message": ...}}`; `snapshot` adds the JPEG as a second frame. The default
endpoint is an ipc:// socket in a directory only the daemon's user can enter (docs/control.md).
"""

from __future__ import annotations

import json
import logging
import os
import socket as pysocket
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zmq

from vigild.config import ConfigError, ControlConfig, CurveConfig
from vigild.curve import ClientKeys
from vigild.publisher import is_loopback_endpoint

if TYPE_CHECKING:
    from vigild.daemon import Daemon

log = logging.getLogger("vigild.control")

MAX_REQUEST_BYTES = 64 * 1024
"""Larger requests get a `too_large` reply; ZeroMQ itself cuts a peer off above MAX_MESSAGE_BYTES."""
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
POLL_MS = 200
COMMANDS = ("status", "cameras", "reload", "snapshot", "pause", "resume")


class CommandError(Exception):
    """A command that cannot be done; `code` is stable for programs, `message` is for people."""

    def __init__(self, code: str, message: str):
        self.code = code
        super().__init__(message)


def default_endpoint(environ: dict[str, str] | None = None) -> str:
    """ipc://$RUNTIME_DIRECTORY/control under systemd, else in $XDG_RUNTIME_DIR/vigild or /tmp/vigild-<uid>."""
    env = os.environ if environ is None else environ
    runtime = env.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if runtime:
        return f"ipc://{runtime}/control"
    base = env.get("XDG_RUNTIME_DIR")
    directory = Path(base) / "vigild" if base else Path(f"/tmp/vigild-{os.getuid()}")
    return f"ipc://{directory}/control"


def _prepare_ipc(path: Path) -> None:
    """Make the socket's directory owner-only, and refuse to take over a socket another process serves."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = path.parent.stat()
    if info.st_uid != os.getuid():
        raise OSError(f"{path.parent} belongs to another user; the control socket needs a directory of its own")
    if stat.S_IMODE(info.st_mode) & 0o077 and not os.environ.get("RUNTIME_DIRECTORY"):
        path.parent.chmod(0o700)  # systemd's RuntimeDirectoryMode decides there
    if path.exists():
        probe = pysocket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            return  # a stale socket from a process that died: ZeroMQ replaces it
        finally:
            probe.close()
        raise OSError(f"another process is serving {path} (a second vigild?); give this one its own control.endpoint")


class ControlServer:
    def __init__(self, config: ControlConfig, curve: CurveConfig | None, daemon: Daemon):
        self.config = config
        self.endpoint = config.endpoint or default_endpoint()
        self._curve_config = curve
        self.curve: Any = None
        self._daemon = daemon
        self._context = zmq.Context()
        self._socket: zmq.Socket | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="control", daemon=True)
        self._handlers: dict[str, Callable[[dict[str, Any]], tuple[Any, bytes | None]]] = {
            "status": lambda _: (daemon.status(), None),
            "cameras": self._cameras,
            "reload": lambda _: (daemon.reload().as_dict(), None),
            "snapshot": self._snapshot,
            "pause": lambda request: (daemon.pause(self._camera(request)), None),
            "resume": lambda request: (daemon.resume(self._camera(request)), None),
        }

    def start(self) -> None:
        """Bind (raises OSError/zmq.ZMQError with the reason) and serve on the control thread."""
        socket = self._context.socket(zmq.ROUTER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        socket.setsockopt(zmq.ROUTER_MANDATORY, 0)  # a client gone before its reply: drop the reply silently
        socket.setsockopt(zmq.SNDHWM, 1000)
        try:
            if self._curve_config is not None:
                from vigild.curve import CurveServer

                self.curve = CurveServer(self._curve_config, self._context)
                self.curve.secure(socket)
            elif not is_loopback_endpoint(self.endpoint):
                log.warning(
                    "INSECURE: control socket binds %s, reachable from other machines, without CURVE: anyone who "
                    "can connect can reconfigure this daemon; configure `curve:` (docs/security.md)",
                    self.endpoint,
                )
            if self.endpoint.startswith("ipc://"):
                path = Path(self.endpoint[len("ipc://") :])
                _prepare_ipc(path)
                socket.bind(self.endpoint)
                path.chmod(0o600)  # the directory is owner-only already; the socket too
            else:
                socket.bind(self.endpoint)
        except BaseException:
            socket.close(linger=0)
            if self.curve is not None:
                self.curve.stop()
            self._context.term()
            raise
        self._socket = socket
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)

    def _run(self) -> None:
        socket = self._socket
        assert socket is not None
        try:
            while not self._stop.is_set():
                if not socket.poll(POLL_MS):
                    continue
                frames = socket.recv_multipart()
                reply = self._answer(frames)
                if reply is not None:
                    try:
                        socket.send_multipart(reply, flags=zmq.NOBLOCK)
                    except zmq.ZMQError as exc:
                        log.warning("could not send a control reply: %s", exc)
        finally:
            socket.close(linger=0)
            if self.curve is not None:
                self.curve.stop()
            self._context.term()

    def _answer(self, frames: list[bytes]) -> list[bytes] | None:
        """The reply to one message: the client's routing frames, then the reply's frames."""
        if len(frames) < 2:
            return None  # no body at all: nothing to answer (ZeroMQ gives at least the identity and one frame)
        identity, rest = frames[0], frames[1:]
        envelope = [identity]
        if rest[0] == b"":  # a REQ client: echo its delimiter
            envelope.append(b"")
            rest = rest[1:]
        try:
            result, attachment = self._dispatch(rest)
            body = {"ok": True, "result": result}
        except CommandError as exc:
            body, attachment = {"ok": False, "error": {"code": exc.code, "message": str(exc)}}, None
        except ConfigError as exc:
            body, attachment = {"ok": False, "error": {"code": "invalid_config", "message": str(exc)}}, None
        except Exception as exc:  # a bug: answer it, log it, keep serving
            log.exception("control command failed")
            body, attachment = {"ok": False, "error": {"code": "internal", "message": f"{type(exc).__name__}: {exc}"}}, None
        payload = json.dumps(body, default=str).encode()
        return [*envelope, payload] + ([attachment] if attachment is not None else [])

    def _dispatch(self, frames: list[bytes]) -> tuple[Any, bytes | None]:
        if len(frames) != 1:
            raise CommandError("bad_request", f"expected one frame holding a JSON object, got {len(frames)} frames")
        data = frames[0]
        if len(data) > MAX_REQUEST_BYTES:
            raise CommandError("too_large", f"request of {len(data)} bytes; at most {MAX_REQUEST_BYTES}")
        try:
            request = json.loads(data)
        except (UnicodeDecodeError, ValueError) as exc:
            raise CommandError("bad_request", f"not JSON: {exc}") from None
        if not isinstance(request, dict):
            raise CommandError("bad_request", f"expected a JSON object, got {type(request).__name__}")
        command = request.get("cmd")
        if not isinstance(command, str):
            raise CommandError("bad_request", 'expected "cmd": one of ' + ", ".join(COMMANDS))
        handler = self._handlers.get(command)
        if handler is None:
            raise CommandError("unknown_command", f"unknown command {command!r}; known: {', '.join(COMMANDS)}")
        return handler(request)

    @staticmethod
    def _camera(request: dict[str, Any]) -> str:
        camera = request.get("camera")
        if not isinstance(camera, str):
            raise CommandError("bad_request", 'expected "camera": the name of a camera')
        return camera

    def _cameras(self, request: dict[str, Any]) -> tuple[Any, bytes | None]:
        action = request.get("action", "list")
        daemon = self._daemon
        if action == "list":
            return daemon.camera_list(), None
        if action not in ("add", "update", "remove"):
            raise CommandError("bad_request", f'"action" must be list, add, update or remove, got {action!r}')
        name = self._camera(request)
        exists = name in daemon.config.settings.cameras
        if action == "remove":
            return daemon.set_camera(name, None).as_dict(), None
        if action == "add" and exists:
            raise CommandError("exists", f"camera {name!r} exists; use update")
        if action == "update" and not exists:
            raise CommandError("unknown_camera", f"no camera named {name!r}; use add")
        config = request.get("config")
        if not isinstance(config, dict):
            raise CommandError("bad_request", '"config" must be the camera\'s settings as a JSON object')
        return daemon.set_camera(name, config).as_dict(), None

    def _snapshot(self, request: dict[str, Any]) -> tuple[Any, bytes | None]:
        quality = request.get("quality", 90)
        if not isinstance(quality, int) or isinstance(quality, bool) or not 1 <= quality <= 100:
            raise CommandError("bad_request", '"quality" must be an integer from 1 to 100')
        meta, jpeg = self._daemon.snapshot(self._camera(request), quality)
        return {**meta, "bytes": len(jpeg)}, jpeg


class ControlClient:
    """For `vigild ctl` and programs: one request, one reply (a DEALER, so a lost reply never wedges it)."""

    def __init__(self, endpoint: str | None = None, curve: ClientKeys | None = None, timeout: float = 30.0):
        self.endpoint = endpoint or default_endpoint()
        self._context: zmq.Context = zmq.Context.instance()
        self.socket = self._context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            curve.apply(self.socket)
        self.socket.connect(self.endpoint)
        self.timeout = timeout

    def request(self, command: str, **arguments: Any) -> tuple[dict[str, Any], bytes | None]:
        """The reply's JSON and its attachment (a snapshot's JPEG). Raises TimeoutError if none comes."""
        self.socket.send_multipart([b"", json.dumps({"cmd": command, **arguments}).encode()])
        if not self.socket.poll(int(self.timeout * 1000)):
            raise TimeoutError(f"no reply from {self.endpoint} within {self.timeout:g} s")
        frames = self.socket.recv_multipart()
        if frames and frames[0] == b"":
            frames = frames[1:]
        return json.loads(frames[0]), frames[1] if len(frames) > 1 else None

    def close(self) -> None:
        self.socket.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

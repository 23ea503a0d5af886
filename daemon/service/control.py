"""The control socket: JSON commands over ZeroMQ, answered on their own thread.

A ROUTER socket, so that any client shape works (REQ with its empty delimiter frame, or DEALER without one) and
nothing a client sends can wedge it: every request gets exactly one reply, `{"ok": true, "result": ...}` or
`{"ok": false, "error": {"code": ..., "message": ...}}`; `snapshot` adds the JPEG as a second frame. The default
endpoint is an ipc:// socket in a directory only the daemon's user can enter (docs/control.md).

Nothing a client sends can grow memory without bound: a message is read frame by frame and only its first few
frames are kept, ZeroMQ disconnects a peer whose frame exceeds MAX_FRAME_BYTES, and at most RECEIVE_HWM messages
wait. Changes (reload, camera changes, pause, resume) run on a thread of their own, one at a time, so that a
model loading for a new camera never holds up `status`.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import socket as pysocket
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import zmq

from vigild import paths
from vigild.client import ControlClient, default_endpoint  # re-exported: programs import them from here too
from vigild.config.settings import ControlConfig, CurveConfig
from vigild.config.yamlsource import ConfigError
from vigild.lifecycle import ServiceThread
from vigild.outputs.publisher import is_loopback_endpoint
from vigild.service.errors import CommandError

log = logging.getLogger("vigild.control")

MAX_REQUEST_BYTES = 64 * 1024
"""Larger requests get a `too_large` reply; ZeroMQ itself disconnects a peer sending a frame over MAX_FRAME_BYTES."""
MAX_FRAME_BYTES = MAX_REQUEST_BYTES + 64 * 1024
MAX_FRAMES_KEPT = 4
"""Of one message: the routing identity, a REQ client's empty delimiter, the request, and one to tell there were
too many. Further frames are read and dropped at once."""
RECEIVE_HWM = 100
"""Messages ZeroMQ queues for the control thread (per peer) before it stops reading from that peer."""
POLL_MS = 200
CHANGE_POLL_MS = 20
"""While a change runs on its thread: how soon its reply goes out once it is done."""
COMMANDS = ("status", "cameras", "reload", "snapshot", "pause", "resume")
MAX_REQUEST_DEPTH = 32
"""Deepest nesting of lists and objects in a request: a camera's settings need 6 (zones' points)."""


def _prepare_ipc(path: Path) -> None:
    """Use an owner-only directory for the socket (vigild.paths.private_dir): one made here (0700), one of vigild's
    own (under its state or runtime root) tightened with a log line, systemd's RuntimeDirectory= as the unit set it;
    never chmod a directory someone else chose, refuse it when it is open to others. Refuse to take over a socket
    another process serves."""
    paths.socket_path_fits(path)
    directory = paths.private_dir(path.parent)  # refuses a non-directory and another user's
    mode = stat.S_IMODE(directory.stat().st_mode)
    systemd = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if mode & ~paths.dir_mode() and not (systemd and directory.resolve() == Path(systemd).resolve()):
        raise OSError(
            f"{directory} is open to other users (mode {mode:04o}); the control socket needs an owner-only "
            f"directory: `chmod 700 {directory}`, or set control.endpoint to a socket in a directory of its own"
        )
    if path.exists():
        probe = pysocket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            return  # a stale socket from a process that died: ZeroMQ replaces it
        finally:
            probe.close()
        raise OSError(f"another process is serving {path} (a second vigild?); give this one its own control.endpoint")


Handler = Callable[[dict[str, Any]], tuple[Any, bytes | None]]


def _error(code: str, message: str) -> bytes:
    return json.dumps({"ok": False, "error": {"code": code, "message": message}}).encode()


def _depth(value: Any) -> int:
    """How deeply lists and objects nest in a parsed JSON value (a scalar: 0), without recursion."""
    deepest, level = 0, [(value, 1)]
    while level:
        item, depth = level.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        level.extend((child, depth + 1) for child in children)
    return deepest


def _is_change(request: dict[str, Any]) -> bool:
    """Commands that change the configuration (and may load models): they run on the change thread."""
    if request["cmd"] == "cameras":
        return request.get("action") in ("add", "update", "remove")
    return request["cmd"] in ("reload", "pause", "resume")


class Reported(Protocol):
    def as_dict(self) -> dict[str, Any]: ...


class Controlled(Protocol):
    """All the control socket asks of the daemon; it never reaches into the daemon's parts."""

    def status(self) -> dict[str, Any]: ...
    def camera_list(self) -> dict[str, Any]: ...
    def has_camera(self, name: str) -> bool: ...
    def reload(self) -> Reported: ...
    def set_camera(self, name: str, camera: dict[str, Any] | None) -> Reported: ...
    def snapshot(self, name: str, quality: int) -> tuple[dict[str, Any], bytes]: ...
    def pause(self, name: str) -> dict[str, str]: ...
    def resume(self, name: str) -> dict[str, str]: ...


class ControlServer:
    def __init__(self, config: ControlConfig, curve: CurveConfig | None, daemon: Controlled,
                 config_file: Path | None = None):  # fmt: skip
        """`config_file`: the daemon's, whose default socket this is when control.endpoint is unset (per config file
        without XDG_RUNTIME_DIR: vigild.paths.control_endpoint)."""
        self.config = config
        self.endpoint = config.endpoint or paths.control_endpoint(config_file)
        self._curve_config = curve
        self.curve: Any = None
        self._daemon = daemon
        self._context = zmq.Context()
        self._socket: zmq.Socket | None = None
        self._thread = ServiceThread("control", self._run)
        self._change: threading.Thread | None = None
        self._finished: queue.SimpleQueue[list[bytes]] = queue.SimpleQueue()
        """Replies of changes, made on the change thread and sent by the control thread (sockets stay on one)."""
        self._handlers: dict[str, Handler] = {
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
        socket.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
        socket.setsockopt(zmq.RCVHWM, RECEIVE_HWM)
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
            elif self.endpoint.startswith("tcp://"):
                log.warning(
                    "INSECURE: control socket binds %s without CURVE: every local user can connect and reconfigure "
                    "this daemon; use an ipc:// endpoint (owner-only) or configure `curve:` (docs/security.md)",
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
        self._thread.stop(5.0)

    def _run(self, thread: ServiceThread) -> None:
        socket = self._socket
        assert socket is not None
        thread.ready()  # (bound already, on the caller's thread: its error is the caller's)
        try:
            while not thread.stopping.is_set():
                self._send_finished(socket)
                changing = self._change is not None and self._change.is_alive()
                if not socket.poll(CHANGE_POLL_MS if changing else POLL_MS):
                    continue
                frames, count = self._receive(socket)
                reply = self._answer(frames, count)
                if reply is not None:
                    self._send(socket, reply)
        finally:
            socket.close(linger=0)
            if self.curve is not None:
                self.curve.stop()
            self._context.term()

    @staticmethod
    def _receive(socket: zmq.Socket) -> tuple[list[bytes], int]:
        """One message, frame by frame: its first MAX_FRAMES_KEPT frames and how many it had (ZeroMQ delivers a
        message whole, so the rest is there: it is read and dropped, never collected)."""
        kept: list[bytes] = []
        count = 0
        while True:
            frame = socket.recv(copy=False)
            count += 1
            if len(kept) < MAX_FRAMES_KEPT:
                kept.append(frame.bytes)
            if not frame.more:
                return kept, count

    def _send_finished(self, socket: zmq.Socket) -> None:
        while True:
            try:
                reply = self._finished.get_nowait()
            except queue.Empty:
                return
            self._send(socket, reply)

    @staticmethod
    def _send(socket: zmq.Socket, reply: list[bytes]) -> None:
        try:
            socket.send_multipart(reply, flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.warning("could not send a control reply: %s", exc)

    def _answer(self, frames: list[bytes], count: int | None = None) -> list[bytes] | None:
        """The reply to one message of `count` frames (the first ones in `frames`): the client's routing frames,
        then the reply's frames; None when there is nothing to answer yet (a change went to its thread)."""
        count = len(frames) if count is None else count
        if count < 2:
            return None  # no body at all: nothing to answer (ZeroMQ gives at least the identity and one frame)
        identity, rest = frames[0], frames[1:]
        envelope = [identity]
        if rest[0] == b"":  # a REQ client: echo its delimiter
            envelope.append(b"")
            rest = rest[1:]
        try:
            request, handler = self._parse(rest, count - len(envelope))
        except CommandError as exc:
            return [*envelope, _error(exc.code, str(exc))]
        if not _is_change(request):
            return self._reply(envelope, handler, request)
        if self._change is not None and self._change.is_alive():
            message = "another reload or camera change is under way; send this again once it has been answered"
            return [*envelope, _error("busy", message)]

        def change() -> None:
            self._finished.put(self._reply(envelope, handler, request))

        self._change = threading.Thread(target=change, name="control-change", daemon=True)
        self._change.start()
        return None

    def _reply(self, envelope: list[bytes], handler: Handler, request: dict[str, Any]) -> list[bytes]:
        try:
            result, attachment = handler(request)
        except CommandError as exc:
            return [*envelope, _error(exc.code, str(exc))]
        except ConfigError as exc:  # `forbidden`: a key or source only the config file may set (docs/security.md)
            code = "forbidden" if getattr(exc, "forbidden", False) else "invalid_config"
            return [*envelope, _error(code, str(exc))]
        except Exception as exc:  # a bug: answer it, log it, keep serving
            log.exception("control command failed")
            return [*envelope, _error("internal", f"{type(exc).__name__}: {exc}")]
        payload = json.dumps({"ok": True, "result": result}, default=str).encode()
        return [*envelope, payload] + ([attachment] if attachment is not None else [])

    def _parse(self, frames: list[bytes], parts: int) -> tuple[dict[str, Any], Handler]:
        if parts != 1:
            raise CommandError("bad_request", f"expected one frame holding a JSON object, got {parts} frames")
        data = frames[0]
        if len(data) > MAX_REQUEST_BYTES:
            raise CommandError("too_large", f"request of {len(data)} bytes; at most {MAX_REQUEST_BYTES}")
        try:
            request = json.loads(data)
        except RecursionError:
            raise CommandError("bad_request", "JSON nested too deeply") from None
        except (UnicodeDecodeError, ValueError) as exc:
            raise CommandError("bad_request", f"not JSON: {exc}") from None
        if _depth(request) > MAX_REQUEST_DEPTH:  # every later step (copy, validation) recurses per level
            raise CommandError("bad_request", f"JSON nested more than {MAX_REQUEST_DEPTH} levels deep")
        if not isinstance(request, dict):
            raise CommandError("bad_request", f"expected a JSON object, got {type(request).__name__}")
        command = request.get("cmd")
        if not isinstance(command, str):
            raise CommandError("bad_request", 'expected "cmd": one of ' + ", ".join(COMMANDS))
        handler = self._handlers.get(command)
        if handler is None:
            raise CommandError("unknown_command", f"unknown command {command!r}; known: {', '.join(COMMANDS)}")
        return request, handler

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
        exists = daemon.has_camera(name)
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


__all__ = ["MAX_FRAME_BYTES", "MAX_REQUEST_BYTES", "CommandError", "ControlClient", "ControlServer", "default_endpoint"]

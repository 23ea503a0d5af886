"""The web console (`web:`, docs/web.md): pages, a versioned JSON API and live pictures, served by aiohttp on an
event loop of its own thread, beside the chain (it never holds it up: the live frames come through a newest-only
hand-off, vigild.web.live; the daemon's calls run on the loop's executor).

Why aiohttp: HTTP, WebSockets, TLS and middlewares in one established library that runs on any asyncio loop,
so the console is one thread of the daemon (no second process to supervise, no ASGI server besides).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import sqlite3
import ssl
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any, Protocol, TypeVar

from aiohttp import WSMsgType, web

from vigild.config.loading import Config, ConfigError
from vigild.config.settings import WebConfig
from vigild.lifecycle import ServiceThread
from vigild.outputs.clip_store import (
    ClipRow,
    clip_by_id,
    clips_of_events,
    export_relative,
    has_clip_tables,
    segments_between,
)
from vigild.outputs.history import HistoryError, open_journal, parse_time
from vigild.outputs.journal_files import SNAPSHOTS, default_path, snapshot_name
from vigild.outputs.journal_query import Query, select
from vigild.paths import private_dir, state_dir
from vigild.web.auth import Guard, load_or_create_token
from vigild.web.live import LiveFeed

log = logging.getLogger("vigild.web")

API = "/api/v1"
MAX_BODY = 1 << 20
PAGE_DEFAULT, PAGE_MAX = 50, 500
STATIC_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml",
                ".png": "image/png", ".txt": "text/plain"}  # fmt: skip
T = TypeVar("T")


class ConsoleSource(Protocol):
    """What the console needs of the daemon (vigild.service.daemon.Daemon)."""

    @property
    def config(self) -> Config: ...

    def status(self) -> dict[str, Any]: ...

    def snapshot(self, name: str, quality: int = 90) -> tuple[dict[str, Any], bytes]: ...

    def edit_geometry(self, camera: str, zones: dict[str, Any], lines: dict[str, Any]) -> dict[str, Any]:
        """Save the camera's zones and lines (validated as a reload is, applied without restarting the camera);
        ConfigError naming each problem's key, with nothing changed."""
        ...


def static_files() -> dict[str, tuple[bytes, str]]:
    """The assets shipped in the package (vigild/web/static), by name: served from memory, by exact name only."""
    files = {}
    for entry in resources.files("vigild.web").joinpath("static").iterdir():
        suffix = Path(entry.name).suffix
        if entry.is_file() and suffix in STATIC_TYPES:
            files[entry.name] = (entry.read_bytes(), STATIC_TYPES[suffix])
    return files


class WebConsole:
    def __init__(self, config: WebConfig, source: ConsoleSource):
        self.config = config
        self.source = source
        self.live = LiveFeed(config.live_fps, config.live_quality, config.live_max_side)
        self.url: str | None = None
        self._thread = ServiceThread("web", self._serve)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None
        self._static = static_files()
        self.requests = 0

    # ----- lifecycle (the daemon's thread)

    def start(self) -> None:
        self.live.start()
        try:
            self._thread.start(timeout=30)
        except Exception:
            self.live.stop()
            raise

    def stop(self) -> None:
        loop, stopped = self._loop, self._stopped
        if loop is not None and stopped is not None:
            with contextlib.suppress(RuntimeError):  # the loop ended meanwhile
                loop.call_soon_threadsafe(stopped.set)
        self._thread.stop(10)
        self.live.stop()

    def status(self) -> dict[str, Any]:
        return {"url": self.url, "state": "running" if self._thread.alive else "stopped", "error": self._thread.error,
                "viewers": self.live.viewers(), "live_encoded": self.live.encoded}  # fmt: skip

    # ----- the console's thread

    def _serve(self, thread: ServiceThread) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._main(thread))
        finally:
            loop.close()

    async def _main(self, thread: ServiceThread) -> None:
        self._stopped = asyncio.Event()
        config = self.source.config
        directory = private_dir(state_dir(config.file))
        token, made = load_or_create_token(directory)
        context = None
        if self.config.tls is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(str(self.config.tls.cert), str(self.config.tls.key))
        guard = Guard(token, secure=context is not None)
        app = web.Application(middlewares=[guard.middleware], client_max_size=MAX_BODY)
        self._routes(app)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.config.host, self.config.port, ssl_context=context, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise OSError(f"the web console cannot listen on {self.config.listen}: {exc.strerror or exc}") from None
        sockets = getattr(site._server, "sockets", None) or []
        port = sockets[0].getsockname()[1] if sockets else self.config.port
        host = self.config.host if ":" not in self.config.host else f"[{self.config.host}]"
        self.url = f"{'https' if context else 'http'}://{host}:{port}/"
        if not self.config.loopback and context is None:
            log.warning("INSECURE: the web console listens on %s without TLS (web.insecure: true): the token and "
                        "the pictures cross the network in the clear", self.config.listen)  # fmt: skip
        log.info("web console: %s?token=%s%s", self.url, token, " (a new token)" if made else "")
        thread.ready()
        watcher = asyncio.ensure_future(self._watch_stop(thread))
        await self._stopped.wait()
        watcher.cancel()
        await runner.cleanup()

    async def _watch_stop(self, thread: ServiceThread) -> None:
        while not thread.stopping.is_set():
            await asyncio.sleep(0.2)
        assert self._stopped is not None
        self._stopped.set()

    async def _call(self, function: Callable[..., T], *args: Any) -> T:
        """A call into the daemon, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(None, functools.partial(function, *args))

    def _routes(self, app: web.Application) -> None:
        app.router.add_get("/", self.page)
        app.router.add_get("/static/{name}", self.asset)
        app.router.add_get(API, self.api_index)
        app.router.add_get(f"{API}/status", self.api_status)
        app.router.add_get(f"{API}/cameras", self.api_cameras)
        app.router.add_get(f"{API}/cameras/{{camera}}/geometry", self.api_geometry)
        app.router.add_put(f"{API}/cameras/{{camera}}/geometry", self.api_put_geometry)
        app.router.add_get(f"{API}/cameras/{{camera}}/snapshot.jpg", self.api_camera_snapshot)
        app.router.add_get(f"{API}/cameras/{{camera}}/live", self.api_live)
        app.router.add_get(f"{API}/events", self.api_events)
        app.router.add_get(f"{API}/events/{{seq}}/snapshot.jpg", self.api_event_snapshot)
        app.router.add_get(f"{API}/clips/{{clip}}", self.api_clip)

    # ----- pages

    async def page(self, request: web.Request) -> web.StreamResponse:
        body, kind = self._static["index.html"]
        return web.Response(body=body, content_type=kind, headers={"Cache-Control": "no-store"})

    async def asset(self, request: web.Request) -> web.StreamResponse:
        found = self._static.get(request.match_info["name"])  # an exact name of the package's: no path at all
        if found is None:
            raise web.HTTPNotFound(text="no such asset\n")
        return web.Response(body=found[0], content_type=found[1], headers={"Cache-Control": "no-cache"})

    # ----- the API

    async def api_index(self, request: web.Request) -> web.StreamResponse:
        return _json({"version": 1, "endpoints": [f"{API}/status", f"{API}/cameras",
                      f"{API}/cameras/{{camera}}/geometry", f"{API}/cameras/{{camera}}/snapshot.jpg",
                      f"{API}/cameras/{{camera}}/live", f"{API}/events", f"{API}/events/{{seq}}/snapshot.jpg"]})  # fmt: skip

    async def api_status(self, request: web.Request) -> web.StreamResponse:
        return _json(await self._call(self.source.status))

    async def api_cameras(self, request: web.Request) -> web.StreamResponse:
        status = await self._call(self.source.status)
        config = self.source.config
        cameras = []
        for name, camera in config.cameras.items():
            state = status["cameras"].get(name, {})
            cameras.append({"name": name, "state": state.get("state"), "fps": state.get("fps"),
                            "drops": state.get("drops"), "frames": state.get("frames"),
                            "last_error": state.get("last_error"), "zones": camera.zones, "lines": camera.lines})  # fmt: skip
        return _json({"cameras": cameras})

    def _camera(self, request: web.Request) -> str:
        name = request.match_info["camera"]
        if name not in self.source.config.cameras:
            raise _error(web.HTTPNotFound, "unknown_camera", f"no camera named {name!r}")
        return name

    async def api_geometry(self, request: web.Request) -> web.StreamResponse:
        name = self._camera(request)
        config = self.source.config
        camera = config.cameras[name]
        origins = {f"{kind}.{entry}": where for (cam, kind, entry), where in config.edits.origins.items() if cam == name}
        return _json({"camera": name, "zones": camera.zones, "lines": camera.lines, "origins": origins})

    async def api_put_geometry(self, request: web.Request) -> web.StreamResponse:
        name = self._camera(request)
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _error(web.HTTPBadRequest, "bad_request", "the body is not JSON") from None
        if not isinstance(body, dict) or set(body) - {"zones", "lines"}:
            raise _error(web.HTTPBadRequest, "bad_request", "expected {\"zones\": {...}, \"lines\": {...}}")
        zones, lines = body.get("zones", {}), body.get("lines", {})
        if not isinstance(zones, dict) or not isinstance(lines, dict):
            raise _error(web.HTTPBadRequest, "bad_request", "`zones` and `lines` are mappings of names")
        try:
            applied = await self._call(self.source.edit_geometry, name, zones, lines)
        except ConfigError as exc:
            problems = [{"key": problem.dotted(), "message": problem.message} for problem in exc.problems]
            return _json({"error": "invalid_config", "problems": problems}, status=422)
        except Exception as exc:  # busy, or the daemon stopping: said, nothing changed
            code = getattr(exc, "code", "failed")
            return _json({"error": code, "message": str(exc)}, status=409)
        return _json({"applied": applied})

    async def api_camera_snapshot(self, request: web.Request) -> web.StreamResponse:
        name = self._camera(request)
        try:
            _, jpeg = await self._call(self.source.snapshot, name, 85)
        except Exception as exc:
            raise _error(web.HTTPNotFound, getattr(exc, "code", "no_frame"), str(exc)) from None
        return web.Response(body=jpeg, content_type="image/jpeg", headers={"Cache-Control": "no-store"})

    async def api_events(self, request: web.Request) -> web.StreamResponse:
        query = request.query
        try:
            limit = min(PAGE_MAX, max(1, int(query.get("limit", PAGE_DEFAULT))))
            before = int(query["before"]) if "before" in query else None
            since = parse_time(query["since"], option="since") if query.get("since") else None
            until = parse_time(query["until"], option="until") if query.get("until") else None
        except (ValueError, HistoryError) as exc:
            raise _error(web.HTTPBadRequest, "bad_request", str(exc)) from None
        selection = Query(camera=query.get("camera") or None, type_prefix=query.get("type") or None,
                          label=query.get("label") or None, since=since, until=until, before_seq=before,
                          limit=limit + 1, newest_first=True)  # fmt: skip
        events = await self._call(self._select, selection)
        more = len(events) > limit
        events = events[:limit]
        return _json({"events": events, "next_before": events[-1]["seq"] if more and events else None})

    def _journal(self) -> Path:
        journal = self.source.config.settings.journal
        return Path(journal.path) if journal.path else default_path(self.source.config.file)

    def _select(self, selection: Query) -> list[dict[str, Any]]:
        if not self.source.config.settings.journal.enabled:
            return []
        try:
            db = open_journal(self._journal())
        except HistoryError:
            return []
        try:
            events = list(select(db, selection))
            if has_clip_tables(db):  # the clip each event started or extended (docs/recording.md)
                clips = clips_of_events(db, [event["seq"] for event in events])
                for event in events:
                    if event["seq"] in clips:
                        event["clip"] = clips[event["seq"]].brief()
            return events
        finally:
            db.close()

    async def api_clip(self, request: web.Request) -> web.StreamResponse:
        """A clip's MP4 by its id (`<id>.mp4`), served with ranges (a `<video>` seeks with them)."""
        name = request.match_info["clip"]
        clip_id = name.removesuffix(".mp4")
        if not name.endswith(".mp4") or len(clip_id) != 32 or any(c not in "0123456789abcdef" for c in clip_id):
            raise _error(web.HTTPNotFound, "no_clip", "a clip is /clips/<32 hex digits>.mp4")
        row = await self._call(self._clip_row, clip_id)
        if row is None or row.state != "saved":
            state = "no such clip" if row is None else f"the clip is {row.state}"
            raise _error(web.HTTPNotFound, "no_clip", state)
        try:
            path = await self._call(self._playable, row)
        except ValueError as exc:
            raise _error(web.HTTPNotFound, "no_clip", str(exc)) from None
        if not path.is_file():
            raise _error(web.HTTPNotFound, "no_clip", "the clip's file is gone")
        return web.FileResponse(path, headers={"Content-Type": "video/mp4", "Cache-Control": "private, max-age=3600"})

    def _playable(self, row: ClipRow) -> Path:
        """The clip's file; a reference into continuous segments exported once (docs/recording.md)."""
        if row.path:
            return row.checked_file()
        from vigild.capture.recorder import exported  # GStreamer: loaded by the daemon already

        db = open_journal(self._journal())
        try:
            segments = segments_between(db, row.camera, row.start_ts or 0.0, row.end_ts or 0.0)
        finally:
            db.close()
        files = [(s.checked_file(), s.start_ts) for s in segments if s.state == "saved" and s.start_ts is not None]
        return exported(Path(row.root), export_relative(row.id), row.camera, row.id, files, row.start_ts or 0.0,
                        row.end_ts or 0.0)  # fmt: skip

    def _clip_row(self, clip_id: str) -> ClipRow | None:
        if not self.source.config.settings.journal.enabled:
            return None
        try:
            db = open_journal(self._journal())
        except HistoryError:
            return None
        try:
            return clip_by_id(db, clip_id) if has_clip_tables(db) else None
        except sqlite3.Error:
            return None
        finally:
            db.close()

    async def api_event_snapshot(self, request: web.Request) -> web.StreamResponse:
        try:
            seq = int(request.match_info["seq"])
        except ValueError:
            raise _error(web.HTTPBadRequest, "bad_request", "an event's seq is a number") from None
        jpeg = await self._call(self._event_snapshot, seq)
        if jpeg is None:
            raise _error(web.HTTPNotFound, "no_snapshot", f"event {seq} has no snapshot (or retention removed it)")
        return web.Response(body=jpeg, content_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    def _event_snapshot(self, seq: int) -> bytes | None:
        """The JPEG of event `seq`: its file name rebuilt from the row's seq and id (never a path from a request)."""
        try:
            db = open_journal(self._journal())
        except HistoryError:
            return None
        try:
            row = db.execute("SELECT id, snapshot FROM events WHERE seq = ?", (seq,)).fetchone()
        except sqlite3.Error:
            return None
        finally:
            db.close()
        if row is None or row[1] is None:
            return None
        try:
            return (self._journal().parent / SNAPSHOTS / snapshot_name(seq, row[0])).read_bytes()
        except (OSError, ValueError):
            return None

    async def api_live(self, request: web.Request) -> web.StreamResponse:
        name = self._camera(request)
        socket = web.WebSocketResponse(heartbeat=30, max_msg_size=4096)
        await socket.prepare(request)
        loop = asyncio.get_running_loop()
        latest: list[bytes] = []
        ready = asyncio.Event()

        def deliver(message: bytes) -> None:  # the feed's thread: hand over the newest, never wait
            def put() -> None:
                latest[:] = [message]
                ready.set()

            loop.call_soon_threadsafe(put)

        viewer = self.live.watch(name, deliver)
        receiver = asyncio.ensure_future(_drain(socket))
        try:
            while not socket.closed and not receiver.done():
                waiter = asyncio.ensure_future(ready.wait())
                await asyncio.wait({waiter, receiver}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                if latest:
                    message = latest.pop()
                    ready.clear()
                    await socket.send_bytes(message)
        except (ConnectionError, RuntimeError):
            pass
        finally:
            self.live.leave(name, viewer)
            receiver.cancel()
            await socket.close()
        return socket


async def _drain(socket: web.WebSocketResponse) -> None:
    """Read (and ignore) what a viewer sends, until it closes."""
    async for message in socket:
        if message.type in (WSMsgType.ERROR, WSMsgType.CLOSE):
            break


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(data, default=str), status=status, content_type="application/json",
                        headers={"Cache-Control": "no-store"})  # fmt: skip


def _error(kind: type[web.HTTPException], code: str, message: str) -> web.HTTPException:
    return kind(text=json.dumps({"error": code, "message": message}), content_type="application/json")


__all__ = ["ConsoleSource", "WebConsole", "static_files"]

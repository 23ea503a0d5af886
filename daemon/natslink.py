"""One NATS connection (nats-py, asyncio) on a thread of its own, shared by whoever talks to that server with the
same credentials: the `nats` output and the cluster's placement (docs/cluster.md). Its users hand it coroutines
(`submit`, `call`); nats-py reconnects on its own once connected, and the first connection is retried here (every
1 to 5 s) so that a server that is not up yet, or refuses the credentials, is an error in the status and the log,
never a failed start.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from vigild.lifecycle import ServiceThread

log = logging.getLogger("vigild.nats")

T = TypeVar("T")
RETRY_MIN_S, RETRY_MAX_S = 1.0, 5.0
CONNECT_TIMEOUT_S = 3.0
STOP_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class NatsLogin:
    """A server and how to log in: one connection per distinct value."""

    url: str
    username: str | None = None
    password: str | None = None
    creds: str | None = None

    def redact(self, text: str) -> str:
        return text.replace(self.password, "***") if self.password else text


def describe(exc: BaseException) -> str:
    """A failure to talk to the server, in words."""
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, OSError) and not isinstance(exc, TimeoutError):
        return f"cannot connect: {exc.strerror or text}"
    if "authorization" in text.lower() or "authentication" in text.lower():
        return f"the server refused the credentials: {text}"
    return f"{type(exc).__name__}: {text}"


class NatsLink:
    def __init__(self, login: NatsLogin, name: str):
        self.login = login
        self.name = name
        self.error: str | None = None
        """Why it is not connected (the last failure), None while connected or before the first try."""
        self.connects = 0
        self.nc: Any = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.connected = threading.Event()
        self._on_connect: list[Callable[[], Awaitable[None]]] = []
        self._users = 0
        self._lock = threading.Lock()
        self._thread = ServiceThread(f"nats-{name}", self._serve)
        self._stop: asyncio.Event | None = None
        self._closing = False

    # ----- users

    def acquire(self) -> NatsLink:
        """One more user; the first one starts the thread."""
        with self._lock:
            self._users += 1
            if self._users == 1 and not self._thread.alive:
                self._thread = ServiceThread(f"nats-{self.name}", self._serve)
                self._thread.start()
        return self

    def release(self) -> None:
        """One user less; the last one closes the connection."""
        with self._lock:
            self._users -= 1
            if self._users > 0:
                return
        if self.loop is not None and self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.stop(STOP_TIMEOUT_S + 1)

    def on_connect(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run `callback` (a coroutine function) on the link's loop after each (re)connection."""
        self._on_connect.append(callback)

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Run `coro` on the link's loop; its future."""
        assert self.loop is not None, "the link is not started"
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run `coro` on the link's loop and wait for it (TimeoutError after `timeout`)."""
        return self.submit(coro).result(timeout)

    def status(self) -> dict[str, Any]:
        return {"url": self.login.url, "connected": self.connected.is_set(), "error": self.error,
                "connects": self.connects}  # fmt: skip

    # ----- the link's thread

    def _serve(self, thread: ServiceThread) -> None:
        loop = asyncio.new_event_loop()
        self.loop = loop
        self._closing = False
        self._stop = asyncio.Event()
        thread.ready()
        try:
            loop.run_until_complete(self._main())
        finally:
            self.connected.clear()
            loop.close()

    async def _main(self) -> None:
        assert self._stop is not None
        self._connecting = asyncio.create_task(self._connect())
        await self._stop.wait()
        others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in others:  # connecting, and users' tasks (placement rounds) end with the link
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        self._closing = True
        if self.nc is not None:
            try:
                await asyncio.wait_for(self.nc.close(), STOP_TIMEOUT_S)
            except Exception as exc:  # a server that went away while closing
                log.debug("nats %s: close: %s", self.name, exc)

    async def _connect(self) -> None:
        import nats

        delay = RETRY_MIN_S
        while True:
            try:
                options: dict[str, Any] = {
                    "servers": [url.strip() for url in self.login.url.split(",")],
                    "name": f"vigild {self.name}",
                    "connect_timeout": CONNECT_TIMEOUT_S,
                    "allow_reconnect": True,
                    "max_reconnect_attempts": -1,
                    "reconnect_time_wait": 1,
                    "error_cb": self._error,
                    "disconnected_cb": self._disconnected,
                    "reconnected_cb": self._reconnected,
                }
                if self.login.username is not None:
                    options.update(user=self.login.username, password=self.login.password)
                if self.login.creds is not None:
                    options["user_credentials"] = self.login.creds
                self.nc = await nats.connect(**options)
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._problem(describe(exc))
                await asyncio.sleep(delay)
                delay = min(RETRY_MAX_S, delay * 2)
        await self._reconnected()

    async def _reconnected(self) -> None:
        self.connects += 1
        if self.error is not None:
            log.info("nats %s: connected to %s again", self.name, self.login.url)
        self.error = None
        self.connected.set()
        for callback in self._on_connect:
            try:
                await callback()
            except Exception as exc:
                log.error("nats %s: after connecting: %s: %s", self.name, type(exc).__name__, exc)

    async def _disconnected(self) -> None:
        self.connected.clear()
        if not self._closing:
            self._problem("lost the connection to the server")

    async def _error(self, exc: Exception) -> None:
        """nats-py's report of a failure (while it retries on its own)."""
        self._problem(describe(exc))

    def _problem(self, problem: str) -> None:
        problem = self.login.redact(problem)
        if problem != self.error:
            log.error("nats %s: %s (%s); retrying", self.name, problem, self.login.url)
        self.error = problem


class NatsLinks:
    """The daemon's links, one per server and login: the output and the placement share one."""

    def __init__(self, name: str):
        self.name = name
        self._links: dict[NatsLogin, NatsLink] = {}
        self._lock = threading.Lock()

    def get(self, login: NatsLogin) -> NatsLink:
        """The link to `login`, started (one more user: `release` it)."""
        return self.link(login).acquire()

    def link(self, login: NatsLogin) -> NatsLink:
        """The link to `login`, not acquired (its user acquires it when it starts)."""
        with self._lock:
            link = self._links.get(login)
            if link is None:
                link = self._links[login] = NatsLink(login, self.name)
        return link

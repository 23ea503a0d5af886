"""Telling systemd the truth: READY/RELOADING/STOPPING/STATUS over `$NOTIFY_SOCKET`, and a watchdog that pings
only while the daemon is really making progress.

The watchdog does not ping from a timer alone: each ping asks `healthy()` first (the scheduler and the publisher
both went round their loops recently), so a plugin stuck inside `process` stops the pings and systemd restarts
the service after `WatchdogSec`. Without `$NOTIFY_SOCKET` (not under systemd) every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

from sdnotify import SystemdNotifier

from vigild.lifecycle import ServiceThread

log = logging.getLogger("vigild.notify")


def watchdog_interval_s(environ: dict[str, str] | None = None) -> float | None:
    """systemd's `WatchdogSec` as seconds, when the watchdog is meant for this process (sd_watchdog_enabled)."""
    env = os.environ if environ is None else environ
    usec, pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1e6 if value > 0 else None


class ServiceNotifier:
    def __init__(self, healthy: Callable[[float], bool], status: Callable[[], str]):
        """`healthy(max_age_s)`: every loop that must make progress went round within `max_age_s`.
        `status()`: the one-line summary for `STATUS=`."""
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._notifier = SystemdNotifier() if self.enabled else None
        self._healthy = healthy
        self._status = status
        self._watchdog_s = watchdog_interval_s()
        self._thread = ServiceThread("sd-notify", self._run)
        self._unhealthy_logged = False

    def send(self, *fields: str) -> None:
        if self._notifier is not None:
            self._notifier.notify("\n".join(fields))

    def start(self) -> None:
        """Call once every camera has been started: READY=1, then status and watchdog pings until `stop()`."""
        self.send("READY=1", f"STATUS={self._status()}")
        if self.enabled:
            self._thread.start()  # (nothing to set up: ready at once)

    def reloading(self) -> None:
        # MONOTONIC_USEC lets systemd (Type=notify-reload) tell this reload from an earlier one
        self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def reloaded(self) -> None:
        self.send("READY=1", f"STATUS={self._status()}")

    def stopping(self) -> None:
        self._thread.stopping.set()  # (it ends at its next wake-up; nothing waits for it)
        self.send("STOPPING=1", "STATUS=stopping")

    def _run(self, thread: ServiceThread) -> None:
        thread.ready()
        period = self._watchdog_s / 2 if self._watchdog_s else 5.0  # sd_watchdog_enabled(3): ping at half the timeout
        status_every, last_status = 5.0, time.monotonic()
        while not thread.stopping.wait(min(period, status_every)):
            if self._watchdog_s:
                if self._healthy(period):
                    self.send("WATCHDOG=1")
                    self._unhealthy_logged = False
                elif not self._unhealthy_logged:
                    log.error("no progress for %.0f s: withholding the watchdog ping (systemd will restart us)", period)
                    self._unhealthy_logged = True
            if time.monotonic() - last_status >= status_every:
                last_status = time.monotonic()
                self.send(f"STATUS={self._status()}")

"""One way to run a part of the daemon on a thread of its own: start it and wait until it is ready (a socket
bound, a file opened), stop it with a timeout, and keep the error that ended it for the status.

    thread = ServiceThread("publisher", serve)   # serve(thread): set up, thread.ready(), loop until thread.stopping
    thread.start()          # raises StartError with the setup's error: nothing left running
    ...
    thread.stop(timeout=5)  # False: still running after the timeout (logged)

The target runs once. An exception before `ready()` is the start's error; one after it ends the thread, is logged
with its traceback and stays in `error` (the status reports it) until the thread is started again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger("vigild.lifecycle")


class StartError(Exception):
    """The thread's setup failed (before it said it was ready); the message is the setup's error."""


class ServiceThread:
    def __init__(self, name: str, target: Callable[[ServiceThread], None]):
        self.name = name
        self._target = target
        self.stopping = threading.Event()
        """Set by `stop()`: the target's loop ends when it sees it."""
        self.error: str | None = None
        """What ended the thread, or stopped its start (`Type: message`); None while it runs or after a clean end."""
        self._ready = threading.Event()
        self._setup_error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def start(self, timeout: float | None = None) -> None:
        """Start the target and wait until it calls `ready()` (or ends); StartError if it failed before that."""
        self.stopping.clear()
        self._ready.clear()
        self.error = self._setup_error = None
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise StartError(f"{self.name} was not ready within {timeout} s")
        if self._setup_error is not None:
            self._thread.join()
            self.error = f"{type(self._setup_error).__name__}: {self._setup_error}"  # the status says why
            raise StartError(str(self._setup_error)) from self._setup_error

    def ready(self) -> None:
        """Called by the target once it is set up: `start()` returns."""
        self._ready.set()

    def stop(self, timeout: float | None = None) -> bool:
        """Tell the target to stop and wait up to `timeout` for it; False (logged) if it is still running."""
        self.stopping.set()
        thread = self._thread
        if thread is None or thread is threading.current_thread():
            return True
        thread.join(timeout)
        if thread.is_alive():
            log.error("%s did not stop within %s s", self.name, timeout)
            return False
        return True

    @property
    def is_ready(self) -> bool:
        """The target said it was ready (and this start has not failed)."""
        return self._ready.is_set() and self._setup_error is None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        try:
            self._target(self)
        except BaseException as exc:
            if not self._ready.is_set():
                self._setup_error = exc
            else:
                self.error = f"{type(exc).__name__}: {exc}"
                log.exception("%s stopped on an error", self.name)
        finally:
            self._ready.set()  # a target that ended without saying it was ready: start() returns

"""The event bus: the one place every event enters, and the one place events leave for the outputs.

Whoever makes an event (the scheduler for the chain's, a branch or a plugin's own worker, the closing events of a
camera or a reload, the heartbeat thread) hands it to `EventBus.publish`, which is what the daemon gives them as
their `publish` callable. The bus stamps it with its identity, the next `seq` (heartbeats have a sequence of their
own), a fresh `id` and the daemon's `run`, and offers the stamped event to every output that consumes it, in seq
order, without blocking: each output has a bounded queue of its own and counts what it drops, so an output that
falls behind or fails never slows the others or the chain (vigild.outputs.base).

The wire JSON is built once per event, by whichever output needs it first, off the caller's thread, and shared
(`Stamped.wire`). The interface an output implements is `Output`; docs/design.md#outputs says how to add one.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable
from typing import Any, Protocol

from vigild.events import SYSTEM_CAMERA, Event

_WIRE_LOCK = threading.Lock()


class Stamped:
    """An event as the bus stamped it: its `seq` (the heartbeat's own sequence for a heartbeat), `id` and `run`."""

    __slots__ = ("_wire", "event", "id", "run", "seq")

    def __init__(self, seq: int, event_id: str, run: str, event: Event):
        self.seq = seq
        self.id = event_id
        self.run = run
        self.event = event
        self._wire: bytes | str | None = None

    @property
    def topic(self) -> bytes:
        return self.event.topic.encode()

    def wire(self) -> bytes:
        """The event's wire JSON (docs/events.md), compact, built the first time an output asks and then shared;
        ValueError when it cannot be built (a NaN, a value JSON cannot hold: no output can send it)."""
        wire = self._wire
        if wire is None:
            with _WIRE_LOCK:  # once, whichever output's thread asks first
                if self._wire is None:
                    try:
                        body = self.event.to_json_dict(self.seq, self.id, self.run)
                        self._wire = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
                    except (ValueError, TypeError, RecursionError) as exc:
                        self._wire = f"{type(exc).__name__}: {exc}"
                wire = self._wire
        if isinstance(wire, str):
            raise ValueError(wire)
        return wire


class Output(Protocol):
    """What the bus feeds. `feed` is called on the publishing thread, under the bus's lock, for every event the
    output consumes (heartbeats only when `heartbeats` is true), in seq order: it must not block or raise."""

    id: str
    heartbeats: bool

    def feed(self, item: Stamped) -> None: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def status(self) -> dict[str, Any]: ...


class EventBus:
    def __init__(self) -> None:
        self.run = uuid.uuid4().hex
        """This run's id: in every event, so a subscriber can tell a restart from a gap."""
        self._seq = 0
        self._beats = 0
        self._lock = threading.Lock()
        self._events: tuple[Output, ...] = ()
        self._heartbeats: tuple[Output, ...] = ()
        self.fence: Callable[[str, float], bool] | None = None
        """In a cluster: may an event of this camera with this `ts` leave? (vigild.cluster.placement.Fence)"""
        self.fenced = 0
        """Camera events the fence refused: made outside a period this daemon held the camera's lease."""

    def continue_from(self, seq: int) -> None:
        """Go on from `seq` (the journal's last): the next event gets `seq + 1`."""
        with self._lock:
            self._seq = max(self._seq, seq)

    @property
    def last_seq(self) -> int:
        """The seq of the last event stamped (0 before the first of a journal-less run)."""
        return self._seq

    def attach(self, output: Output) -> int:
        """Feed `output` from the next event on; returns the seq of the last event it will not get."""
        with self._lock:
            self._events = (*self._events, output)
            if output.heartbeats:
                self._heartbeats = (*self._heartbeats, output)
            return self._seq

    def detach(self, output: Output) -> None:
        """Stop feeding `output` (it still delivers what it holds when it is stopped)."""
        with self._lock:
            self._events = tuple(o for o in self._events if o is not output)
            self._heartbeats = tuple(o for o in self._heartbeats if o is not output)

    @property
    def outputs(self) -> tuple[Output, ...]:
        return self._events

    def publish(self, event: Event) -> None:
        """Stamp `event` and offer it to the outputs; never blocks on them. Thread-safe."""
        event_id = uuid.uuid4().hex
        fence = self.fence
        camera_event = not event.is_heartbeat and event.camera != SYSTEM_CAMERA
        if fence is not None and camera_event and not fence(event.camera, event.ts_wall):
            self.fenced += 1
            return
        with self._lock:
            if event.is_heartbeat:
                self._beats += 1
                item = Stamped(self._beats, event_id, self.run, event)
                targets = self._heartbeats
            else:
                self._seq += 1
                item = Stamped(self._seq, event_id, self.run, event)
                targets = self._events
            for output in targets:  # under the lock: every output sees the events in seq order
                output.feed(item)

"""Commands on one camera that leave the configuration as it is: pause, resume, snapshot.

Pause and resume are small changes made like a reconfiguration: the camera is closed (or reopened) on the scheduler
thread between two batches, and the daemon commits the `Change` they return."""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

from vigild.service.errors import CommandError
from vigild.service.running import CAPTURE_JOIN_TIMEOUT_S, Change, Pipeline, Running


def _known(running: Running, name: str) -> None:
    if name not in running.captures:
        raise CommandError("unknown_camera", f"no camera named {name!r}")


def _close(name: str, running: Running, pipeline: Pipeline, reason: str) -> None:
    """Scheduler thread: a pause (or release) answered `busy` never got here, and touched nothing."""
    running.captures[name].stop()
    pipeline.exchange.retire(name)  # drops what waits: nothing of it reaches the chain after this
    pipeline.scheduler.close_camera(name, reason)


def pause(running: Running, name: str, pipeline: Pipeline, timeout: float) -> Change[dict[str, str]]:
    """Stop capturing `name` (its connection is closed, `camera.down` with reason `paused`) until `resume`."""
    _known(running, name)
    reply = {"camera": name, "state": "paused"}
    if name in running.paused:
        return Change(running, reply)
    if name in running.unheld:  # not captured here: it stays paused if this daemon comes to hold it
        return Change(dataclasses.replace(running, paused=running.paused | {name}), reply)
    pipeline.on_scheduler(partial(_close, name, running, pipeline, "paused"), timeout)
    running.captures[name].join(CAPTURE_JOIN_TIMEOUT_S)
    return Change(dataclasses.replace(running, paused=running.paused | {name}), reply)


def release(running: Running, name: str, pipeline: Pipeline, timeout: float, reason: str) -> Change[dict[str, str]]:
    """In a cluster: stop capturing `name`, whose lease this daemon gives up or lost (`camera.down` with `reason`)."""
    _known(running, name)
    reply = {"camera": name, "state": "unheld"}
    if name in running.unheld:
        return Change(running, reply)
    if name not in running.paused:
        pipeline.on_scheduler(partial(_close, name, running, pipeline, reason), timeout)
        running.captures[name].join(CAPTURE_JOIN_TIMEOUT_S)
    return Change(dataclasses.replace(running, unheld=running.unheld | {name}), reply)


def hold(running: Running, name: str, pipeline: Pipeline, timeout: float) -> Change[dict[str, str]]:
    """In a cluster: capture `name`, whose lease this daemon now holds (still paused if it was paused)."""
    _known(running, name)
    if name not in running.unheld:
        return Change(running, {"camera": name, "state": "held"})
    held = dataclasses.replace(running, unheld=running.unheld - {name})
    if name in running.paused:
        return Change(held, {"camera": name, "state": "paused"})
    return _reopen(held, name, pipeline, timeout, "held")


def resume(running: Running, name: str, pipeline: Pipeline, timeout: float) -> Change[dict[str, str]]:
    """Capture `name` again, with a new connection."""
    _known(running, name)
    if name in running.paused and name in running.unheld:  # held elsewhere: it starts when this daemon holds it
        return Change(dataclasses.replace(running, paused=running.paused - {name}), {"camera": name,
                                                                                     "state": "unheld"})  # fmt: skip
    if name not in running.paused:
        return Change(running, {"camera": name, "state": running.captures[name].stats.state.value})
    return _reopen(dataclasses.replace(running, paused=running.paused - {name}), name, pipeline, timeout, "resumed")


def _reopen(running: Running, name: str, pipeline: Pipeline, timeout: float, state: str) -> Change[dict[str, str]]:
    """A new capture of `name` (its old one stopped), to start once the change is committed."""
    pipeline.on_scheduler(partial(pipeline.scheduler.reopen_camera, name), timeout)
    pipeline.exchange.admit(name)
    capture = pipeline.capture(running.config, name)
    reopened = dataclasses.replace(running, captures={**running.captures, name: capture})
    return Change(reopened, {"camera": name, "state": state}, (capture,))


def snapshot(running: Running, pipeline: Pipeline, name: str, quality: int) -> tuple[dict[str, Any], bytes]:
    """The last frame of `name` that came through the chain, as a JPEG."""
    import cv2

    if name not in running.config.settings.cameras:
        raise CommandError("unknown_camera", f"no camera named {name!r}")
    frame = pipeline.scheduler.latest.get(name)
    if frame is None:
        raise CommandError("no_frame", f"camera {name!r} has no frame yet")
    ok, jpeg = cv2.imencode(".jpg", frame.image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise CommandError("internal", "JPEG encoding failed")
    height, width = frame.image.shape[:2]
    meta = {"camera": name, "frame": frame.index, "ts": frame.ts_wall, "width": width, "height": height}
    return meta, jpeg.tobytes()

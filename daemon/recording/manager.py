"""The daemon's recording (docs/recording.md): turns events into clips, tells the cameras' recorders, records the
clips in the journal's side tables, publishes `clip.start`, `clip.saved` and `clip.dropped`, and applies
retention.

It takes events from the bus like an output (`feed`, never blocking) and the recorders' reports from the exchange
(`report`, from any thread); both are handled in order on a thread of its own, so nothing here ever slows the chain.

A triggering event (`recording.events` of its camera) starts a clip from `ts - pre_s` to `ts + post_s`, or, when
its camera has a clip whose window it falls in, extends that one to `ts + post_s`, never beyond `max_s` from the
clip's first frame: a trigger past that starts the next clip. Each clip is a row of `clips`; each event that
started or extended it, a row of `clip_events`, so the clip of an event is found from the event and the events of
a clip from the clip, and the events themselves, already published and journaled, stay as they were.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vigild.capture.camera import Capture
from vigild.capture.clips import ClipOrder, ClipReport, ClipState
from vigild.capture.recorder import PART, export, probe_file, repair
from vigild.config.recording import CameraRecordingConfig, RecordingConfig, day_seconds
from vigild.events import SYSTEM_CAMERA, Event, Publish, iso_utc
from vigild.lifecycle import ServiceThread
from vigild.outputs.bus import Stamped
from vigild.outputs.clip_store import ClipRow, ClipStore, exported_file

log = logging.getLogger("vigild.recording")

MB = 1 << 20
RETENTION_INTERVAL_S = 30.0
LOST_AFTER_S = 60.0
"""A clip whose window ended this long ago without a word from its camera (its worker died with the order): lost."""
REMOVE_BATCH = 64
CLIP_EVENTS = ("clip.start", "clip.saved", "clip.dropped")


@dataclass
class _Open:
    """A camera's clip whose window is still open (as far as the daemon knows)."""

    clip_id: str
    start_ts: float
    end_ts: float
    cap_ts: float
    """`max_s` after its first frame (estimated from its wanted start until the camera says)."""
    retain_until: float
    post_s: float


def clip_path(camera: str, clip_id: str, ts: float) -> str:
    """`<camera>/<YYYY-MM-DD>/<HH-MM-SS>-<8 hex>.mp4` (UTC), relative to the recordings root."""
    stamp = time.strftime("%Y-%m-%d/%H-%M-%S", time.gmtime(ts))
    return f"{camera}/{stamp}-{clip_id[:8]}.mp4"


class Recording:
    id = "recording"
    heartbeats = False

    def __init__(self, root: Path, database: Path, section: RecordingConfig | None,
                 camera_settings: Callable[[str], CameraRecordingConfig | None],
                 captures: Callable[[], Mapping[str, Capture]], publish: Publish, run: str):  # fmt: skip
        """`camera_settings`: a camera's recording settings in the current config (None: not recorded);
        `captures`: the running captures, to send orders to; `publish`: the event bus."""
        self.root = root
        self.database = database
        self.section = section or RecordingConfig()
        self._settings = camera_settings
        self._captures = captures
        self._publish = publish
        self._run = run
        self._cond = threading.Condition()
        self._queue: deque[Stamped | ClipReport] = deque()
        self._open: dict[str, _Open] = {}
        self._store: ClipStore | None = None
        self._thread = ServiceThread("recording", self._serve)
        self.counters: Counter[str] = Counter()
        self.drops: Counter[str] = Counter()
        self.error: str | None = None
        self.bytes_on_disk = 0
        self.repaired = 0
        self._writing: set[str] = set()

    # ----- the bus's and the exchange's side (any thread, never blocking)

    def feed(self, item: Stamped) -> None:
        event = item.event
        if event.camera == SYSTEM_CAMERA or event.type in CLIP_EVENTS:
            return
        self._put(item)

    def report(self, report: ClipReport) -> None:
        self._put(report)

    def _put(self, item: Stamped | ClipReport) -> None:
        with self._cond:
            self._queue.append(item)
            self._cond.notify()

    # ----- lifecycle

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """After the captures stopped (their clips saved and reported): what is queued is handled, then it ends."""
        self._thread.stopping.set()
        with self._cond:
            self._cond.notify_all()
        self._thread.stop(timeout)

    def status(self) -> dict[str, Any]:
        """The heartbeat's `recording`: clips by result, drops by reason, bytes on disk."""
        return {"state": "failed" if self.error else "running" if self._thread.alive else "stopped",
                "error": self.error, "root": str(self.root), "writing": len(self._writing),
                "saved": self.counters["saved"], "segments": self.counters["segments"],
                "dropped": dict(self.drops), "expired": self.counters["expired"], "repaired": self.repaired,
                "bytes": self.bytes_on_disk}  # fmt: skip

    # ----- the thread

    def _serve(self, thread: ServiceThread) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o750)
            self._store = ClipStore(self.database)
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            log.error("recording cannot use %s / %s: %s; no clips this run", self.root, self.database, exc)
            thread.ready()
            self._drain_forever(thread)
            return
        thread.ready()
        try:
            self._recover()
        except Exception:
            log.exception("recording: repairing what the last run left failed (going on)")
        next_retention = time.monotonic()
        while True:
            with self._cond:
                while not self._queue and not thread.stopping.is_set() and time.monotonic() < next_retention:
                    self._cond.wait(max(0.05, next_retention - time.monotonic()))
                batch = list(self._queue)
                self._queue.clear()
            for item in batch:
                try:
                    if isinstance(item, ClipReport):
                        self._reported(item)
                    else:
                        self._event(item)
                except Exception:  # a bug for one event must not end recording
                    log.exception("recording: could not handle %s", type(item).__name__)
            if thread.stopping.is_set() and not batch:
                break
            if time.monotonic() >= next_retention:
                next_retention = time.monotonic() + RETENTION_INTERVAL_S
                try:
                    self._retention()
                    self._give_up_lost()
                    self._conclude_references()
                except Exception:
                    log.exception("recording: retention failed (going on)")
        self._store.close()

    def _drain_forever(self, thread: ServiceThread) -> None:
        while not thread.stopping.is_set():
            with self._cond:
                self._cond.wait(0.5)
                self._queue.clear()

    # ----- events → orders

    def _event(self, item: Stamped) -> None:
        event = item.event
        settings = self._settings(event.camera)
        if settings is None:
            return
        matched = [t for t in settings.events if t.matches(event.type, event.object, event.data)]
        if not matched:
            return
        assert self._store is not None
        ts = event.ts_wall
        retain = ts + day_seconds(max(t.retain_days or settings.retain_days for t in matched))
        current = self._open.get(event.camera)
        reference = settings.continuous is not None  # the clip is a window of the continuous segments
        if current is not None and ts <= current.end_ts and ts + settings.post_s <= current.cap_ts:
            current.end_ts = max(current.end_ts, ts + settings.post_s)
            current.retain_until = max(current.retain_until, retain)
            self._store.link(current.clip_id, [(item.seq, item.id, "extend")], current.retain_until)
            if reference:
                self._store.update(current.clip_id, end_ts=current.end_ts)
            else:
                self._order(event.camera, current, settings)
            return
        clip_id = uuid.uuid4().hex
        start = ts - settings.pre_s
        opened = _Open(clip_id, start, ts + settings.post_s, start + settings.max_s, retain, settings.post_s)
        self._open[event.camera] = opened
        path = "" if reference else clip_path(event.camera, clip_id, ts)
        self._store.add(clip_id, event.camera, self.root, path, self._run, retain, ref=reference,
                        links=[(item.seq, item.id, "start")])  # fmt: skip
        if reference:
            self._store.update(clip_id, state="writing", start_ts=start, end_ts=opened.end_ts)
            self._writing.add(clip_id)
            row = self._store.get(clip_id)
            if row is not None:
                self._announce(row, self._store.events_of(clip_id), reference=True)
        else:
            self._order(event.camera, opened, settings)

    def _order(self, camera: str, clip: _Open, settings: CameraRecordingConfig) -> None:
        assert self._store is not None
        row = self._store.get(clip.clip_id)
        path = row.path if row is not None else clip_path(camera, clip.clip_id, clip.start_ts)
        capture = self._captures().get(camera)
        order = ClipOrder(clip.clip_id, path, clip.start_ts, clip.end_ts, settings.max_s)
        if capture is None:  # paused or being replaced: nothing records it
            self._reported(ClipReport(clip.clip_id, camera, ClipState.DROPPED, path, reason="camera_stopped",
                                      error="the camera is not capturing"))  # fmt: skip
            return
        capture.record(order)

    # ----- reports → rows and events

    def _reported(self, report: ClipReport) -> None:
        store = self._store
        assert store is not None
        if report.segment:
            self._segment(report)
            return
        row = store.get(report.clip_id)
        if row is None or row.state in ("saved", "dropped", "expired"):
            return  # not ours (a clip of an earlier config), or already concluded
        values: dict[str, Any] = {"state": report.state.value}
        if report.start_ts is not None:
            values["start_ts"] = report.start_ts
        if report.codec is not None:
            values.update(codec=report.codec, width=report.width, height=report.height)
        if report.state is not ClipState.WRITING:
            values.update(end_ts=report.end_ts, frames=report.frames, bytes=report.bytes, reason=report.reason,
                          error=report.error)  # fmt: skip
        store.update(report.clip_id, **values)
        current = self._open.get(report.camera)
        if report.state is ClipState.WRITING:
            self._writing.add(report.clip_id)
            if current is not None and current.clip_id == report.clip_id and report.start_ts is not None:
                settings = self._settings(report.camera)
                if settings is not None:
                    current.cap_ts = report.start_ts + settings.max_s
        else:
            self._writing.discard(report.clip_id)
            if current is not None and current.clip_id == report.clip_id:
                del self._open[report.camera]
            if report.state is ClipState.SAVED:
                self.counters["saved"] += 1
                self.bytes_on_disk += report.bytes
            else:
                self.drops[report.reason or "error"] += 1
                log.warning("camera %s: clip %s dropped (%s)%s", report.camera, report.path, report.reason,
                            f": {report.error}" if report.error else "")  # fmt: skip
        row = store.get(report.clip_id)
        if row is not None:
            self._announce(row, store.events_of(report.clip_id))

    def _announce(self, row: ClipRow, events: list[str], **extra: Any) -> None:
        kind = {"writing": "clip.start", "saved": "clip.saved", "dropped": "clip.dropped"}.get(row.state)
        if kind is None:
            return
        data: dict[str, Any] = {"clip_id": row.id, "path": row.path}
        if row.start_ts is not None:
            data["start"] = iso_utc(row.start_ts)
        if kind == "clip.saved" and row.end_ts is not None:
            data.update(end=iso_utc(row.end_ts), duration_s=row.duration_s, frames=row.frames, bytes=row.bytes)
        if row.codec is not None:
            data.update(codec=row.codec, width=row.width, height=row.height)
        if kind != "clip.start":
            data["reason"] = row.reason
        if kind == "clip.dropped" and row.error:
            data["error"] = row.error
        data["events"] = events
        data.update(extra)
        ts = row.end_ts if kind == "clip.saved" and row.end_ts else row.start_ts if row.start_ts else time.time()
        self._publish(Event(kind, row.camera, ts, None, None, data))

    def _segment(self, report: ClipReport) -> None:
        store = self._store
        assert store is not None
        settings = self._settings(report.camera)
        days = settings.continuous.retain_days if settings is not None and settings.continuous else 1.0
        if report.state is ClipState.WRITING:
            store.add(report.clip_id, report.camera, self.root, report.path, self._run,
                      (report.start_ts or time.time()) + day_seconds(days), segment=True)  # fmt: skip
            store.update(report.clip_id, state="writing", start_ts=report.start_ts, codec=report.codec,
                         width=report.width, height=report.height)  # fmt: skip
            self._writing.add(report.clip_id)
            return
        self._writing.discard(report.clip_id)
        if store.get(report.clip_id) is None:  # (its start was not heard: a report lost as a worker restarted)
            store.add(report.clip_id, report.camera, self.root, report.path, self._run,
                      (report.start_ts or time.time()) + day_seconds(days), segment=True)  # fmt: skip
        store.update(report.clip_id, state=report.state.value, start_ts=report.start_ts, end_ts=report.end_ts,
                     frames=report.frames, bytes=report.bytes, reason=report.reason, error=report.error)  # fmt: skip
        if report.state is ClipState.SAVED:
            self.counters["segments"] += 1
            self.bytes_on_disk += report.bytes
        else:
            self.drops[f"segment_{report.reason or 'error'}"] += 1
        self._conclude_references()

    def _conclude_references(self) -> None:
        """Reference clips whose window has passed and whose segments are all written: saved (or dropped, when
        no segment holds any of it)."""
        store = self._store
        assert store is not None
        now = time.time()
        for row in store.open_references():
            if row.end_ts is None or row.start_ts is None or now < row.end_ts:
                continue
            segments = store.segments_between(row.camera, row.start_ts, row.end_ts)
            still = [s for s in segments if s.state in ("pending", "writing")]
            if still and now - row.end_ts < LOST_AFTER_S + 3600:  # the segment holding its end is being written
                continue
            kept = [s for s in segments if s.state == "saved"]
            current = self._open.get(row.camera)
            if current is not None and current.clip_id == row.id:
                del self._open[row.camera]
            self._writing.discard(row.id)
            if not kept:
                store.update(row.id, state="dropped", reason="no_segments",
                             error="no continuous segment holds any of its window")  # fmt: skip
                self.drops["no_segments"] += 1
            else:
                end = min(row.end_ts, max(s.end_ts or row.end_ts for s in kept))
                first = kept[0]
                store.update(row.id, state="saved", end_ts=end, reason="done", codec=first.codec, width=first.width,
                             height=first.height)  # fmt: skip
                self.counters["saved"] += 1
            concluded = store.get(row.id)
            if concluded is not None:
                extra = {"reference": True, "segments": [s.path for s in kept]} if kept else {"reference": True}
                self._announce(concluded, store.events_of(row.id), **extra)

    def _give_up_lost(self) -> None:
        now = time.time()
        for camera, clip in list(self._open.items()):
            if clip.clip_id not in self._writing and now - clip.end_ts > LOST_AFTER_S:
                self._reported(ClipReport(clip.clip_id, camera, ClipState.DROPPED, "", reason="lost",
                                          error="no word from the camera's capture (it was restarted)"))  # fmt: skip

    # ----- storage

    def _recover(self) -> None:
        """What an earlier run left unfinished: `.part` files remuxed up to their last complete fragment (or
        removed), their rows concluded; stray temporary files removed."""
        store = self._store
        assert store is not None
        for row in store.unfinished(self._run):
            if row.ref:  # a window of the segments: concluded by them (_conclude_references)
                continue
            part = row.file.with_name(row.file.name + PART)
            if not part.exists() and row.path and row.file.is_file():  # finished after the last run stopped listening
                info = probe_file(row.file)
                if info is not None:
                    end = row.start_ts + info["duration_s"] if row.start_ts is not None else None
                    store.update(row.id, state="saved", end_ts=end, frames=info["frames"], reason="stopped",
                                 bytes=row.file.stat().st_size, codec=info["codec"], width=info["width"],
                                 height=info["height"])  # fmt: skip
                    continue
            fixed = repair(part) if part.exists() else None
            info = probe_file(fixed) if fixed is not None else None
            if fixed is not None and info is not None:
                size = fixed.stat().st_size
                end = row.start_ts + info["duration_s"] if row.start_ts is not None else None
                store.update(row.id, state="saved", end_ts=end, frames=info["frames"], bytes=size, reason="repaired",
                             codec=info["codec"], width=info["width"], height=info["height"])  # fmt: skip
                self.repaired += 1
                log.warning("recording: %s was cut off by the last run's end; kept its first %.1f s", row.path,
                            info["duration_s"])  # fmt: skip
                if not row.segment:
                    concluded = store.get(row.id)
                    if concluded is not None:
                        self._announce(concluded, store.events_of(row.id), repaired=True)
            else:
                store.update(row.id, state="dropped", reason="killed", error="the daemon ended while it was written")
        known = store.known_paths()
        for stray in [*self.root.rglob(f"*{PART}"), *self.root.rglob(f"*{PART}.fix")]:
            relative = stray.relative_to(self.root).as_posix()
            if relative.removesuffix(".fix").removesuffix(PART) not in known:
                stray.unlink(missing_ok=True)
        self.bytes_on_disk = store.saved_bytes()

    def _retention(self) -> None:
        store = self._store
        assert store is not None
        now = time.time()
        for row in store.expired(now):
            self._remove(row, "retention")
        cap = int(self.section.max_size_mb * MB)
        while store.saved_bytes() > cap:
            rows = store.oldest_saved(REMOVE_BATCH)
            if not rows:
                break
            excess = store.saved_bytes() - cap
            for row in rows:
                if excess <= 0:
                    break
                self._remove(row, "size_cap")
                excess -= row.bytes
        floor = int(self.section.min_free_mb * MB)
        while floor and _free_bytes(self.root) < floor:
            rows = store.oldest_saved(1)
            if not rows:
                break
            self._remove(rows[0], "free_space")
        self.bytes_on_disk = store.saved_bytes()

    def _remove(self, row: ClipRow, why: str) -> None:
        """A saved clip's file goes; its row stays (`expired`), and so do its events. A segment that goes takes the
        reference clips into it along, except those kept longer than the segment (`retain_days` of their trigger),
        which are exported to files of their own first."""
        store = self._store
        assert store is not None
        if row.segment:
            for clip in store.references_into(row):
                if why == "retention" and clip.retain_until > time.time():
                    self._export(clip)
                else:
                    self._forget(clip, why)
        if row.path:
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                row.checked_file().unlink()
            with contextlib.suppress(OSError, ValueError):  # an empty day directory goes too
                row.checked_file().parent.rmdir()
        self._forget(row, why)

    def _forget(self, row: ClipRow, why: str) -> None:
        assert self._store is not None
        self._store.update(row.id, state="expired", error=why)
        self.counters["expired"] += 1
        export = exported_file(self.root, row.id)
        export.unlink(missing_ok=True)

    def _export(self, clip: ClipRow) -> None:
        """A reference clip becomes a file of its own (its segments are about to go, it is kept longer)."""
        store = self._store
        assert store is not None and clip.start_ts is not None and clip.end_ts is not None
        segments = [(s.checked_file(), s.start_ts) for s in store.segments_between(clip.camera, clip.start_ts,
                    clip.end_ts) if s.state == "saved" and s.start_ts is not None]  # fmt: skip
        relative = clip_path(clip.camera, clip.id, clip.start_ts)
        report = export(clip.camera, clip.id, self.root, relative, segments, clip.start_ts, clip.end_ts)
        if report.state is ClipState.SAVED:
            store.update(clip.id, path=relative, bytes=report.bytes, frames=report.frames, end_ts=report.end_ts)
        else:
            log.warning("recording: clip %s could not be kept beyond its segments: %s", clip.id, report.error)


def _free_bytes(path: Path) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 1 << 62


__all__ = ["Recording", "clip_path"]

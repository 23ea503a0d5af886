"""Zone and line analytics over tracked objects: enter/exit with dwell, loitering, occupancy counts, line crossings.

Runs after a tracker (it reads `tracker_id`; untracked detections are ignored) on the zones and lines of each
camera's config. Every decision has hysteresis: an object must be seen on the new side `min_frames` times in a
row before it enters, exits or crosses, so a box jittering on an edge produces nothing. Frames in which a track is
not seen (occlusion) change nothing: when it reappears under the same id it has not left. Every `zone.enter` gets
exactly one `zone.exit`: when the object leaves, when its track ends (`frame.tracks.ended`, the tracker's verdict
on the same frame), or when the camera stops. Events are described in docs/analytics.md.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, Field

from vigild.events import Event, object_payload
from vigild.frame import Detections, Frame
from vigild.plugin import Plugin, PluginConfig, PluginConfigError
from vigild.plugins.analytics.geometry import CameraGeometry, crosses_segment, inside_polygon, side_of_line
from vigild.vision.snapshot import make_snapshot

Anchor = Literal["bottom_center", "center", "top_center"]


class AnalyticsConfig(PluginConfig):
    type: Literal["analytics"] = "analytics"
    anchor: Anchor = Field("bottom_center", description="The point of a box that must be in a zone or cross a line.")
    min_frames: int = Field(3, ge=1, description="Consecutive sightings on the new side before enter/exit/cross.")
    loiter_s: float | None = Field(30.0, gt=0, description="Dwell in a zone that raises `zone.loiter` (once a visit).")
    count_debounce_s: float = Field(
        1.0, ge=0, description="`zone.count` is published at most once per this many seconds per zone."
    )
    classes: list[str] | None = Field(None, description="Only objects with these labels; default all.")
    zones: list[str] | None = Field(None, description="The camera's zones to watch; default all of them.")
    lines: list[str] | None = Field(None, description="The camera's lines to watch; default all of them.")
    snapshot: Literal["none", "crop", "frame"] = Field(
        "none",
        description="Attach a JPEG to enter, exit (when seen leaving), loiter (when seen) and cross events: the "
        "object's crop or the whole frame with its box drawn, as the message's third part.",
    )
    snapshot_max_side: int = Field(640, ge=16, description="Snapshots are scaled down to at most this many pixels.")
    snapshot_quality: int = Field(80, ge=10, le=100, description="JPEG quality.")
    snapshot_max_bytes: int = Field(
        200_000, ge=1000, description="A snapshot that stays larger than this (after re-encoding) is left out."
    )


@dataclass
class _Presence:
    inside: bool = False
    streak: int = 0
    entered_ts: float = 0.0
    loitered: bool = False


@dataclass
class _Side:
    side: int = 0
    """Confirmed side: +1 right-hand (`in` side), -1 left-hand, 0 not yet known."""
    streak: int = 0
    last_anchor: np.ndarray | None = None
    """Where the object was last seen on its confirmed side: the start of a crossing."""


@dataclass
class _Track:
    label: str
    last_seen: tuple[Detections, int]
    """Where it was last seen: the tracked detections of that frame while it is seen, then its own row alone."""
    zones: dict[str, _Presence] = field(default_factory=dict)
    lines: dict[str, _Side] = field(default_factory=dict)


@dataclass
class _Count:
    published: Counter[str] = field(default_factory=Counter)
    last_published: float = float("-inf")


@dataclass
class _Camera:
    size: tuple[int, int]
    zones: dict[str, np.ndarray]
    lines: dict[str, tuple[np.ndarray, np.ndarray]]
    tracks: dict[int, _Track] = field(default_factory=dict)
    counts: dict[str, _Count] = field(default_factory=dict)
    seen: Detections | None = None
    """The tracked detections of its latest frame."""
    source: tuple[Any, Any] = ((), ())
    """The camera's `zones:` and `lines:` settings these were made of (an edit changes them without a restart)."""


def anchor_points(xyxy: np.ndarray, anchor: Anchor) -> np.ndarray:
    x = (xyxy[:, 0] + xyxy[:, 2]) / 2
    y = {"bottom_center": xyxy[:, 3], "top_center": xyxy[:, 1], "center": (xyxy[:, 1] + xyxy[:, 3]) / 2}[anchor]
    return np.stack([x, y], axis=1).astype(np.float64)


class Analytics(Plugin[AnalyticsConfig]):
    Config = AnalyticsConfig
    requires: ClassVar[frozenset[str]] = frozenset({"tracks"})
    camera_settings: ClassVar[type[BaseModel] | None] = CameraGeometry  # each camera's zones: and lines:
    batched = False  # state per camera and track: one frame at a time, in order

    def start(self) -> None:
        self.check_cameras(self.context.cameras)
        self._cameras: dict[str, _Camera] = {}

    def check_cameras(self, cameras: Mapping[str, Any]) -> None:
        for camera, config in cameras.items():
            for kind, wanted, available in (
                ("zones", self.config.zones, config.zones),
                ("lines", self.config.lines, config.lines),
            ):
                missing = sorted(set(wanted or ()) - set(available))
                if missing:
                    raise PluginConfigError(kind, f"camera {camera} has no {kind} named {', '.join(missing)}")

    def _camera(self, frame: Frame) -> tuple[_Camera, bool]:
        """The camera's state, and whether what it watches is new (its first frame, or zones or lines changed)."""
        state = self._cameras.get(frame.camera)
        config = self.context.cameras[frame.camera]
        if state is not None and state.size == frame.size:
            zones_, lines_ = state.source
            if (zones_ is config.zones or zones_ == config.zones) and (lines_ is config.lines or lines_ == config.lines):
                return state, False
        width, height = frame.size
        zones, lines = {}, {}
        geometry = CameraGeometry.of_camera(config)  # checked when the config was loaded (camera_settings)
        for name, zone in geometry.zones.items():
            if self.config.zones is None or name in self.config.zones:
                zones[name] = self._on_frame(frame, "zones", name, zone.pixels(zone.points, width, height))
        for name, line in geometry.lines.items():
            if self.config.lines is None or name in self.config.lines:
                points = self._on_frame(frame, "lines", name, line.pixels(list(line.points), width, height))
                lines[name] = (points[0], points[1])
        fresh = _Camera(frame.size, zones, lines, source=(config.zones, config.lines))
        if state is None:
            self._cameras[frame.camera] = fresh
            return fresh, True
        # the frame size changed (a reconnect at another resolution) or an edit changed the geometry: the tracks go
        # on; a visit to a zone that is gone or moved ends (`reconfigured`), a line that is gone or moved forgets
        # which side each object was on
        fresh.tracks = state.tracks
        fresh.counts = {zone: count for zone, count in state.counts.items() if zone in zones}
        moved_zones = {z for z in state.zones if z not in zones or not np.array_equal(state.zones[z], zones[z])}
        moved_lines = {n for n in state.lines if n not in lines or not all(
            np.array_equal(a, b) for a, b in zip(state.lines[n], lines[n], strict=True))}  # fmt: skip
        for track in fresh.tracks.values():
            for moved in moved_zones & set(track.zones):
                presence = track.zones.pop(moved)
                if presence.inside:
                    frame.events.append(Event("zone.exit", frame.camera, frame.ts_wall, frame.index,
                                              object_payload(*track.last_seen),
                                              {"zone": moved, "dwell_s": round(frame.ts_wall - presence.entered_ts, 3),
                                               "reason": "reconfigured"}))  # fmt: skip
            for gone in moved_lines:
                track.lines.pop(gone, None)
        self._cameras[frame.camera] = fresh
        return fresh, bool(moved_zones or moved_lines or set(zones) != set(state.zones) or set(lines) != set(state.lines))

    def _on_frame(self, frame: Frame, kind: str, name: str, points: np.ndarray) -> np.ndarray:
        width, height = frame.size
        if (points[:, 0] > width).any() or (points[:, 1] > height).any():
            self.log.error(
                "camera %s: %s.%s has points outside its %dx%d frames; they are clipped to the frame "
                "(use normalized: true for resolution-independent geometry)",
                frame.camera,
                kind,
                name,
                width,
                height,
            )
            points = np.minimum(points, (width, height))
        return points

    def process(self, frames: list[Frame]) -> None:
        for frame in frames:
            self._analyse(frame)

    def _analyse(self, frame: Frame) -> None:
        state, new = self._camera(frame)
        if new:  # what this camera is watched for, so that a consumer knows its zones and lines before any count
            data = {"plugin": self.config.id or self.config.type, "zones": sorted(state.zones),
                    "lines": sorted(state.lines)}  # fmt: skip
            frame.events.append(Event("analytics.start", frame.camera, frame.ts_wall, frame.index, data=data))
        detections = frame.detections
        keep = detections.tracker_id >= 0
        if self.config.classes is not None:
            labels = np.array([detections.label(i) for i in range(len(detections))], dtype=object)
            keep &= np.isin(labels, self.config.classes)
        index = np.flatnonzero(keep)
        seen = state.seen = detections[index]
        anchors = anchor_points(seen.xyxy, self.config.anchor)
        ts = frame.ts_wall
        inside = {name: inside_polygon(anchors, polygon) for name, polygon in state.zones.items()}
        sides = {name: side_of_line(anchors, *ends) for name, ends in state.lines.items()}
        for row, track_id in enumerate(seen.tracker_id.tolist()):
            track = state.tracks.get(track_id)
            if track is None:
                track = state.tracks[track_id] = _Track(seen.label(row), (seen, row))
            track.last_seen = (seen, row)
            for name, flags in inside.items():
                self._zone_step(frame, track, name, bool(flags[row]), ts)
            for name, observed in sides.items():
                self._line_step(frame, state, track, name, int(observed[row]), anchors[row])
        ended = frame.tracks.ended.track_id.tolist() if frame.tracks is not None else []
        for track_id in ended:  # the tracker's verdicts on this frame: their visits are over
            track = state.tracks.pop(track_id, None)
            if track is not None:
                self._close(frame.camera, frame.index, ts, track, "track_end", frame.events)
        for track in state.tracks.values():  # those not seen now keep their own row, not the frame's detections
            last, row = track.last_seen
            if last is not seen and len(last) > 1:
                track.last_seen = (last[np.array([row])], 0)  # a copy: a slice would be a view of all the rows
        self._loiter(frame, state, ts)
        self._counts(frame, state, ts)

    def _loiter(self, frame: Frame, state: _Camera, ts: float) -> None:
        """Every visit that has lasted `loiter_s`, also of objects hidden right now (they have not left)."""
        loiter = self.config.loiter_s
        if loiter is None:
            return
        for track in state.tracks.values():
            for zone, presence in track.zones.items():
                if presence.inside and not presence.loitered and ts - presence.entered_ts >= loiter:
                    presence.loitered = True
                    dwell = round(ts - presence.entered_ts, 3)
                    frame.events.append(self._event("zone.loiter", frame, track, {"zone": zone, "dwell_s": dwell}))

    def _zone_step(self, frame: Frame, track: _Track, zone: str, observed: bool, ts: float) -> None:
        presence = track.zones.setdefault(zone, _Presence())
        if observed == presence.inside:
            presence.streak = 0
        else:
            presence.streak += 1
            if presence.streak >= self.config.min_frames:
                presence.inside, presence.streak = observed, 0
                if observed:
                    presence.entered_ts, presence.loitered = ts, False
                    frame.events.append(self._event("zone.enter", frame, track, {"zone": zone}))
                else:
                    dwell = round(ts - presence.entered_ts, 3)
                    frame.events.append(
                        self._event("zone.exit", frame, track, {"zone": zone, "dwell_s": dwell, "reason": "left"})
                    )

    def _line_step(
        self, frame: Frame, state: _Camera, track: _Track, line: str, observed: int, anchor: np.ndarray
    ) -> None:
        side = track.lines.setdefault(line, _Side())
        if observed == 0:
            return  # exactly on the line: wait for a side
        if side.side == 0:
            side.side, side.last_anchor = observed, anchor
            return
        if observed == side.side:
            side.streak, side.last_anchor = 0, anchor
            return
        side.streak += 1
        if side.streak < self.config.min_frames:
            return
        start, end = state.lines[line]
        assert side.last_anchor is not None
        through = crosses_segment(side.last_anchor[None], anchor[None], start, end)[0]
        side.side, side.streak, side.last_anchor = observed, 0, anchor
        if through:  # otherwise it went around the line's end: a change of side, not a crossing
            direction = "in" if observed > 0 else "out"
            frame.events.append(self._event("line.cross", frame, track, {"line": line, "direction": direction}))

    def _counts(self, frame: Frame, state: _Camera, ts: float) -> None:
        """Publish a zone's occupancy when it differs from what was last published, at most once per
        `count_debounce_s` (the latest value then: a busy zone reports its count steadily instead of never)."""
        for zone in state.zones:
            current: Counter[str] = Counter(
                track.label for track in state.tracks.values() if track.zones.get(zone, _Presence()).inside
            )
            count = state.counts.setdefault(zone, _Count())
            if current == count.published or ts - count.last_published < self.config.count_debounce_s:
                continue
            count.published, count.last_published = current, ts
            frame.events.append(
                Event(
                    "zone.count",
                    frame.camera,
                    ts,
                    frame.index,
                    data={"zone": zone, "counts": dict(sorted(current.items())), "total": sum(current.values())},
                )
            )

    def _close(
        self, camera: str, frame_index: int, ts: float, track: _Track, reason: str, out: list[Event]
    ) -> None:
        for zone, presence in track.zones.items():
            if presence.inside:
                presence.inside = False
                out.append(
                    Event(
                        "zone.exit",
                        camera,
                        ts,
                        frame_index,
                        object_payload(*track.last_seen),
                        {"zone": zone, "dwell_s": round(ts - presence.entered_ts, 3), "reason": reason},
                    )
                )

    def _event(self, kind: str, frame: Frame, track: _Track, data: dict[str, Any]) -> Event:
        payload = object_payload(*track.last_seen)
        event = Event(kind, frame.camera, frame.ts_wall, frame.index, payload, data)
        config = self.config
        seen_now = track.last_seen[0] is self._cameras[frame.camera].seen
        if config.snapshot != "none" and seen_now:  # only of an object seen now
            event.snapshot = make_snapshot(
                frame.image,
                payload["bbox"],
                config.snapshot,
                config.snapshot_max_side,
                config.snapshot_quality,
                config.snapshot_max_bytes,
            )
        return event

    def on_source_end(self, camera: str, ts_wall: float, frame_index: int) -> list[Event]:
        state = self._cameras.pop(camera, None)
        if state is None:
            return []
        events: list[Event] = []
        for track in state.tracks.values():
            self._close(camera, frame_index, ts_wall, track, "source_end", events)
        return events

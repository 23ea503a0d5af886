"""What the MQTT output keeps retained on the broker (docs/mqtt.md#retained-state): each camera's state, objects in
view per class, zone occupancy, line counts and the latest snapshots, made from the events as they are delivered
(`StateTopics`); and the Home Assistant discovery configs of the entities that read them (`Discovery`).

Both only compute: they return (topic, payload) pairs, which the output publishes retained; an empty payload
clears a retained topic (a camera removed by a reload takes its state and its entities with it). Both remember what
they published, for a broker that lost its retained messages (one without persistence, restarted).
"""

from __future__ import annotations

import json
import logging
import re
import threading
from dataclasses import dataclass, field
from typing import Any

Message = tuple[str, bytes]
STATE_EVENTS = frozenset({"camera.up", "camera.down", "track.new", "track.end", "zone.count", "zone.enter",
                          "line.cross", "analytics.start"})  # fmt: skip
"""The event types the retained state is made from (any other only for its snapshot)."""
DOWN_STATES = {"paused": "paused", "stopped": "stopped", "end_of_stream": "ended"}
"""A `camera.down`'s reason → the camera's state (any other reason: `down`, until the heartbeat says more)."""
_UNSAFE_LEVEL = re.compile(r"[/+#\x00]")
_UNSAFE_ID = re.compile(r"[^A-Za-z0-9_-]")
log = logging.getLogger("vigild.outputs")


def level(name: str) -> str:
    """A name (a class label, a zone) as one topic level: `/`, `+`, `#` and NUL become `_`."""
    return _UNSAFE_LEVEL.sub("_", name) or "_"


def slug(name: str) -> str:
    """A name as Home Assistant's ids allow ([A-Za-z0-9_-])."""
    return _UNSAFE_ID.sub("_", name) or "_"


@dataclass(frozen=True)
class Topics:
    prefix: str
    daemon_id: str

    def event(self, camera: str, kind: str) -> str:
        return f"{self.prefix}/{camera}/{kind}"

    @property
    def available(self) -> str:
        return f"{self.prefix}/sys/{self.daemon_id}/available"

    @property
    def heartbeat(self) -> str:
        return f"{self.prefix}/sys/{self.daemon_id}/heartbeat"

    @property
    def gap(self) -> str:
        return f"{self.prefix}/sys/{self.daemon_id}/gap"

    def state(self, camera: str, *parts: str) -> str:
        return "/".join((self.prefix, camera, "state", *(level(part) for part in parts)))

    def command(self, camera: str) -> str:
        return f"{self.prefix}/{camera}/set/enabled"

    def command_camera(self, topic: str) -> str | None:
        head, tail = f"{self.prefix}/", "/set/enabled"
        if topic.startswith(head) and topic.endswith(tail):
            camera = topic[len(head) : -len(tail)]
            return camera if camera and "/" not in camera else None
        return None


@dataclass
class Camera:
    """One camera's state, as of the events delivered; counts start over with each run of the daemon."""

    run: str
    since: str
    """When the line counts count from: the first event of this run on the camera (its `ts`)."""
    state: str | None = None
    objects: dict[int, str] = field(default_factory=dict)
    labels: set[str] = field(default_factory=set)
    zones: dict[str, dict[str, int]] = field(default_factory=dict)
    lines: dict[str, dict[str, int]] = field(default_factory=dict)
    zone_snapshots: set[str] = field(default_factory=set)
    watched: dict[str, tuple[list[str], list[str]]] = field(default_factory=dict)
    """Per analytics plugin, the zones and lines it said it watches (`analytics.start`)."""


class StateTopics:
    def __init__(self, topics: Topics, snapshots: bool):
        self.topics = topics
        self.snapshots = snapshots
        self.cameras: dict[str, Camera] = {}
        self.version = 0
        """Bumped whenever the set of entities changes (a camera, class, zone or line appears or goes)."""
        self.malformed = 0
        """Events the state could not follow (a field missing or of the wrong kind)."""
        self._published: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def retained(self) -> list[Message]:
        """Everything retained now (to publish again to a broker that lost it)."""
        with self._lock:
            return list(self._published.items())

    def update(self, camera: str, kind: str, body: bytes, snapshot: bytes | None = None) -> list[Message]:
        """The retained messages that change with this event (none for an event without the fields its type has:
        it is still delivered, only the state cannot follow it)."""
        if kind not in STATE_EVENTS and (snapshot is None or not self.snapshots):
            return []
        event = json.loads(body)
        if not _complete(kind, event):  # checked before anything changes: the state never follows half an event
            self.malformed += 1
            if self.malformed == 1 or self.malformed % 1000 == 0:
                log.warning("MQTT state: %d event(s) without the fields their type has, the latest a %s; "
                            "delivered, not counted", self.malformed, kind)  # fmt: skip
            return []
        return self._update(camera, kind, event, snapshot)

    def _update(self, camera: str, kind: str, event: dict[str, Any], snapshot: bytes | None) -> list[Message]:
        if kind == "camera.down" and event.get("reason") == "removed":
            return self._remove(camera)
        state = self._camera(camera, event)
        out: list[Message] = []
        if kind == "camera.up":
            state.state = "streaming"
            out += self._set(self.topics.state(camera, "camera"), b"streaming")
        elif kind == "camera.down":
            state.state = DOWN_STATES.get(event.get("reason", ""), "down")
            out += self._set(self.topics.state(camera, "camera"), state.state.encode())
        elif kind in ("track.new", "track.end") and isinstance(event.get("object"), dict):
            out += self._track(camera, state, kind, event["object"])
        elif kind == "zone.count":
            out += self._zone(camera, state, str(event["zone"]), event.get("counts") or {})
        elif kind == "line.cross":
            out += self._line(camera, state, str(event["line"]), str(event.get("direction")))
        elif kind == "analytics.start":
            out += self._watch(camera, state, event)
        if snapshot is not None and self.snapshots:
            out += self._set(self.topics.state(camera, "snapshot"), snapshot)
            if kind == "zone.enter" and "zone" in event:
                zone = str(event["zone"])
                if zone not in state.zone_snapshots:
                    state.zone_snapshots.add(zone)
                    self.version += 1
                out += self._set(self.topics.state(camera, "zones", zone, "snapshot"), snapshot)
        return out

    def heartbeat(self, beat: dict[str, Any]) -> list[Message]:
        """Each known camera's state from the heartbeat (`connecting`, `streaming`, `backoff`, `paused`...)."""
        out: list[Message] = []
        for camera, status in (beat.get("cameras") or {}).items():
            state = self.cameras.get(camera)
            if state is not None and isinstance(status, dict) and status.get("state") != state.state:
                state.state = str(status.get("state"))
                out += self._set(self.topics.state(camera, "camera"), state.state.encode())
        return out

    # ----- inside

    def _camera(self, camera: str, event: dict[str, Any]) -> Camera:
        state = self.cameras.get(camera)
        run = str(event.get("run", ""))
        if state is None or state.run != run:  # a new run counts from zero (the old one's lines are reset below)
            fresh = Camera(run, str(event.get("ts")), state.state if state else None)
            if state is not None:
                fresh.zones = {zone: {} for zone in state.zones}
                fresh.lines = {line: {"in": 0, "out": 0} for line in state.lines}
                fresh.labels, fresh.zone_snapshots = state.labels, state.zone_snapshots
            else:
                self.version += 1
            self.cameras[camera] = state = fresh
        return state

    def _set(self, topic: str, payload: bytes) -> list[Message]:
        with self._lock:
            if self._published.get(topic) == payload:
                return []
            self._published[topic] = payload
        return [(topic, payload)]

    def _track(self, camera: str, state: Camera, kind: str, obj: dict[str, Any]) -> list[Message]:
        label = str(obj.get("label"))
        if kind == "track.new":
            state.objects[int(obj.get("track_id", -1))] = label
        else:
            state.objects.pop(int(obj.get("track_id", -1)), None)
        if label not in state.labels:
            state.labels.add(label)
            self.version += 1
        counts = {name: 0 for name in sorted(state.labels)}
        for name in state.objects.values():
            counts[name] += 1
        out = self._set(self.topics.state(camera, "objects"), _json(counts))
        out += self._set(self.topics.state(camera, "objects", label), str(counts[label]).encode())
        return out

    def _zone(self, camera: str, state: Camera, zone: str, counts: dict[str, int]) -> list[Message]:
        if zone not in state.zones:
            self.version += 1
        known = state.zones.setdefault(zone, {})
        for label in set(known) | set(counts):
            if label not in known:
                self.version += 1
            known[label] = int(counts.get(label, 0))
        total = sum(known.values())
        out = self._set(self.topics.state(camera, "zones", zone), _json({"counts": dict(sorted(known.items())),
                                                                         "total": total}))  # fmt: skip
        out += self._set(self.topics.state(camera, "zones", zone, "total"), str(total).encode())
        out += self._set(self.topics.state(camera, "zones", zone, "occupied"), b"ON" if total else b"OFF")
        for label, count in known.items():
            out += self._set(self.topics.state(camera, "zones", zone, "objects", label), str(count).encode())
        return out

    def _line(self, camera: str, state: Camera, line: str, direction: str | None) -> list[Message]:
        if line not in state.lines:
            state.lines[line] = {"in": 0, "out": 0}
            self.version += 1
        counts = state.lines[line]
        if direction in counts:
            counts[direction] += 1
        out = self._set(self.topics.state(camera, "lines", line), _json({**counts, "since": state.since}))
        for direction_ in ("in", "out"):
            out += self._set(self.topics.state(camera, "lines", line, direction_), str(counts[direction_]).encode())
        return out

    def _watch(self, camera: str, state: Camera, event: dict[str, Any]) -> list[Message]:
        """An analytics plugin's zones and lines from its start: each known at once (zone total 0, line counts 0
        since now); those no plugin watches any more (a reload removed them) are cleared."""
        zones, lines = [str(z) for z in event.get("zones", [])], [str(n) for n in event.get("lines", [])]
        state.watched[str(event.get("plugin"))] = (zones, lines)
        out: list[Message] = []
        for zone in zones:
            out += self._zone(camera, state, zone, state.zones.get(zone, {}))
        for line in lines:
            if line not in state.lines:
                out += self._line(camera, state, line, None)
        kept_zones = {z for watched, _ in state.watched.values() for z in watched}
        kept_lines = {n for _, watched in state.watched.values() for n in watched}
        for zone in [z for z in state.zones if z not in kept_zones]:
            del state.zones[zone]
            state.zone_snapshots.discard(zone)
            out += self._clear(self.topics.state(camera, "zones", zone))
        for line in [n for n in state.lines if n not in kept_lines]:
            del state.lines[line]
            out += self._clear(self.topics.state(camera, "lines", line))
        return out

    def _clear(self, topic: str) -> list[Message]:
        """`topic` and everything under it, cleared (empty retained payloads)."""
        with self._lock:
            gone = [t for t in self._published if t == topic or t.startswith(topic + "/")]
            for t in gone:
                del self._published[t]
        self.version += 1
        return [(t, b"") for t in gone]

    def _remove(self, camera: str) -> list[Message]:
        self.cameras.pop(camera, None)
        return self._clear(self.topics.state(camera))


def _complete(kind: str, event: Any) -> bool:
    """Whether `event` has the fields the state reads for its `kind` (events of other producers may not)."""
    if not isinstance(event, dict):
        return False
    if kind in ("track.new", "track.end"):
        obj = event.get("object")
        return isinstance(obj, dict) and isinstance(obj.get("track_id"), int)
    if kind == "zone.count":
        counts = event.get("counts", {})
        return isinstance(event.get("zone"), str) and isinstance(counts, dict) and all(
            isinstance(n, int) for n in counts.values())  # fmt: skip
    if kind == "line.cross":
        return isinstance(event.get("line"), str)
    if kind == "analytics.start":
        zones, lines = event.get("zones", []), event.get("lines", [])
        return isinstance(zones, list) and isinstance(lines, list)
    if kind == "zone.enter" and "zone" in event:
        return isinstance(event["zone"], str)
    return True


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


class Discovery:
    """Home Assistant MQTT discovery (docs/mqtt.md#home-assistant): a device per camera with its entities, their
    configs retained under `<discovery prefix>/<component>/<node>/<object>/config`."""

    def __init__(self, topics: Topics, prefix: str, version: str, commands: bool):
        self.topics = topics
        self.prefix = prefix
        self.version = version
        self.commands = commands
        self._seen_version = -1
        self._configs: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def retained(self) -> list[Message]:
        with self._lock:
            return list(self._configs.items())

    def update(self, state: StateTopics) -> list[Message]:
        """The configs that appear, change or go (empty payload) since the last call."""
        if state.version == self._seen_version:
            return []
        self._seen_version = state.version
        wanted = dict(self.configs(state))
        with self._lock:
            out = [(topic, b"") for topic in self._configs if topic not in wanted]
            out += [(topic, payload) for topic, payload in wanted.items() if self._configs.get(topic) != payload]
            self._configs = wanted
        return out

    def configs(self, state: StateTopics) -> list[Message]:
        out: list[Message] = []
        for camera, cam in sorted(state.cameras.items()):
            entity = _Entities(self, camera, out)
            state_of = self.topics.state
            entity.add("sensor", "state", {"name": "State", "state_topic": state_of(camera, "camera"),
                                           "icon": "mdi:cctv"}, camera_available=False)  # fmt: skip
            if state.snapshots:
                entity.add("image", "snapshot", {"name": "Snapshot", "image_topic": state_of(camera, "snapshot"),
                                                 "content_type": "image/jpeg"}, camera_available=False)  # fmt: skip
            if self.commands:
                entity.add("switch", "enabled", {
                    "name": "Enabled", "command_topic": self.topics.command(camera),
                    "state_topic": state_of(camera, "camera"),
                    "value_template": "{{ 'OFF' if value == 'paused' else 'ON' }}", "payload_on": "ON",
                    "payload_off": "OFF", "icon": "mdi:cctv"}, camera_available=False)  # fmt: skip
            for label in sorted(cam.labels):
                entity.add("sensor", f"objects_{label}", {
                    "name": f"{label} in view", "unit_of_measurement": "objects", "state_class": "measurement",
                    "state_topic": state_of(camera, "objects", label)})  # fmt: skip
            for zone, labels in sorted(cam.zones.items()):
                entity.add("binary_sensor", f"zone_{zone}_occupied", {
                    "name": f"{zone} occupied", "device_class": "occupancy", "payload_on": "ON", "payload_off": "OFF",
                    "state_topic": state_of(camera, "zones", zone, "occupied")})  # fmt: skip
                entity.add("sensor", f"zone_{zone}_total", {
                    "name": f"{zone} objects", "unit_of_measurement": "objects", "state_class": "measurement",
                    "state_topic": state_of(camera, "zones", zone, "total")})  # fmt: skip
                for label in sorted(labels):
                    entity.add("sensor", f"zone_{zone}_{label}", {
                        "name": f"{zone} {label}", "unit_of_measurement": "objects", "state_class": "measurement",
                        "state_topic": state_of(camera, "zones", zone, "objects", label)})  # fmt: skip
                if zone in cam.zone_snapshots:
                    entity.add(
                        "image",
                        f"zone_{zone}_snapshot",
                        {
                            "name": f"{zone} snapshot",
                            "content_type": "image/jpeg",
                            "image_topic": state_of(camera, "zones", zone, "snapshot"),
                        },
                        camera_available=False,
                    )
            for line in sorted(cam.lines):
                for direction in ("in", "out"):
                    entity.add("sensor", f"line_{line}_{direction}", {
                        "name": f"{line} {direction}", "unit_of_measurement": "crossings",
                        "state_class": "total_increasing", "state_topic": state_of(camera, "lines", line, direction),
                        "json_attributes_topic": state_of(camera, "lines", line)})  # fmt: skip
        return out


class _Entities:
    """The discovery configs of one camera's device, appended to `out`."""

    def __init__(self, discovery: Discovery, camera: str, out: list[Message]):
        self.discovery, self.camera, self.out = discovery, camera, out
        self.node = slug(f"vigild_{discovery.topics.daemon_id}_{camera}")
        self.device = {"identifiers": [self.node], "name": camera, "manufacturer": "vigild", "model": "camera",
                       "sw_version": discovery.version}  # fmt: skip

    def add(self, component: str, key: str, config: dict[str, Any], camera_available: bool = True) -> None:
        """`camera_available`: the entity is available only while the camera streams (else: while the daemon
        is online)."""
        topics, object_id = self.discovery.topics, slug(key)
        availability: list[dict[str, str]] = [
            {"topic": topics.available, "payload_available": "online", "payload_not_available": "offline"}
        ]
        if camera_available:
            availability.append({"topic": topics.state(self.camera, "camera"),
                                 "value_template": "{{ 'online' if value == 'streaming' else 'offline' }}"})  # fmt: skip
        unique = f"{self.node}_{object_id}"
        payload = {"unique_id": unique, "object_id": unique, "device": self.device, "availability": availability,
                   "availability_mode": "all", "origin": {"name": "vigild", "sw_version": self.discovery.version},
                   **config}  # fmt: skip
        self.out.append((f"{self.discovery.prefix}/{component}/{self.node}/{object_id}/config", _json(payload)))

"""The `recording:` section (docs/recording.md): which events start a clip, how much before and after, how long
clips are kept, and optional continuous segments. Top-level for the defaults, under a camera to override them.

Only values here: the capture side keeps the encoded stream and writes the files (vigild.capture.recorder), the
daemon side turns events into clips and applies retention (vigild.recording).
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from vigild.config.overrides import overridden

_DAY = 86_400.0
MAX_RETAIN_DAYS = 36_500.0
TYPE_PATTERN = r"^[A-Za-z0-9_.*-]+$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class TriggerConfig(_Strict):
    """One kind of event that starts (or extends) a clip. A plain string in the list is `{type: ...}`."""

    type: str = Field(
        pattern=TYPE_PATTERN,
        max_length=64,
        description="The event type (`line.cross`, `track.new`, `zone.enter`, `action.start`...); `*` matches any "
        "run of characters (`zone.*`).",
    )
    labels: list[str] | None = Field(None, description="Only events whose object has one of these labels.")
    zones: list[str] | None = Field(None, description="Only events of one of these zones (`zone` field).")
    lines: list[str] | None = Field(None, description="Only events of one of these lines (`line` field).")
    actions: list[str] | None = Field(None, description="Only events of one of these actions (`action` field).")
    retain_days: float | None = Field(
        None, gt=0, le=MAX_RETAIN_DAYS, description="Keep the clips this trigger starts this many days (default: "
        "the section's `retain_days`); a clip started by several triggers is kept as long as the longest says."
    )

    @field_validator("type")
    @classmethod
    def _not_a_clip(cls, value: str) -> str:
        if fnmatch.fnmatchcase("clip.start", value) or fnmatch.fnmatchcase("clip.saved", value):
            raise ValueError(f"{value!r} would match the clip events themselves (a clip would start clips)")
        if value in ("heartbeat", "*"):
            raise ValueError(f"{value!r} matches daemon events, not something that happened in front of a camera")
        return value

    def matches(self, event_type: str, obj: dict[str, Any] | None, data: dict[str, Any]) -> bool:
        if not fnmatch.fnmatchcase(event_type, self.type):
            return False
        if self.labels is not None and (obj is None or obj.get("label") not in self.labels):
            return False
        for key, allowed in (("zone", self.zones), ("line", self.lines), ("action", self.actions)):
            if allowed is not None and data.get(key) not in allowed:
                return False
        return True


def _triggers(value: object) -> object:
    if isinstance(value, list):
        return [{"type": item} if isinstance(item, str) else item for item in value]
    return value


class ContinuousConfig(_Strict):
    """Fixed-length segments of everything the camera sends; event clips are then references into them."""

    segment_s: float = Field(60.0, ge=2, le=3600, description="Seconds per segment file (cut at a keyframe).")
    retain_days: float = Field(1.0, gt=0, le=MAX_RETAIN_DAYS, description="Segments are kept this many days.")


class CameraRecordingConfig(_Strict):
    """A camera's `recording:`: what it sets overrides the top-level section's defaults."""

    enabled: bool = Field(True, description="false: this camera is not recorded, whatever the top level says.")
    events: list[TriggerConfig] = Field(
        default_factory=list, description="Events that start a clip: types (`line.cross`), or `{type, labels, "
        "zones, lines, actions, retain_days}`."
    )
    pre_s: float = Field(5.0, ge=0, le=60, description="Seconds before the event (from the camera's own stream, "
                         "kept in memory from a keyframe).")  # fmt: skip
    post_s: float = Field(5.0, ge=0, le=600, description="Seconds after the last triggering event; a trigger "
                          "during a clip extends it.")  # fmt: skip
    max_s: float = Field(30.0, ge=1, le=3600, description="Longest clip: a busy scene makes several clips.")
    retain_days: float = Field(10.0, gt=0, le=MAX_RETAIN_DAYS, description="Event clips are kept this many days.")
    continuous: ContinuousConfig | None = Field(
        None, description="Record everything in fixed-length segments (`continuous: {}` for the defaults)."
    )
    encode_kbps: int = Field(
        2000, ge=100, le=100_000, description="Sources that send raw video (test://, raw USB): the bit rate of the "
        "H.264 that is encoded for recording (only when recording is on for that camera)."
    )

    @field_validator("events", mode="before")
    @classmethod
    def _plain_types(cls, value: object) -> object:
        return _triggers(value)

    @property
    def records(self) -> bool:
        return self.enabled and (bool(self.events) or self.continuous is not None)


class RecordingConfig(CameraRecordingConfig):
    """The top-level `recording:` section: defaults for every camera, and where recordings go."""

    path: Path | None = Field(
        None, description="The recordings root; default: `recordings/` in the state directory (beside the journal)."
    )
    max_size_mb: float = Field(
        20_480, gt=0, le=1 << 30, description="Recordings' own size cap (clips and segments), apart from the "
        "journal's: the oldest go first."
    )
    min_free_mb: float = Field(
        1024, ge=0, le=1 << 30, description="Free space to leave on the recordings' disk: the oldest go first."
    )


def effective(top: RecordingConfig | None, camera: CameraRecordingConfig | None) -> CameraRecordingConfig | None:
    """The recording settings of one camera: the top-level defaults, overridden by what the camera's section sets;
    None when the camera is not recorded."""
    result = overridden(CameraRecordingConfig, top, camera)
    if result is None or not result.records:
        return None
    return result


def day_seconds(days: float) -> float:
    return days * _DAY


def recordings_root(section: RecordingConfig | None, journal_path: Path) -> Path:
    """Where recordings go: the section's `path`, else `recordings/` beside the journal's database."""
    if section is not None and section.path is not None:
        return section.path
    return journal_path.parent / "recordings"

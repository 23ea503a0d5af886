"""The plugin interface: a pydantic config paired with a class that processes a batch of frames.

Lifecycle (as in Savant): `__init__(config, context)` validates and keeps settings, `start()` loads models and
opens resources, `process(frames)` runs once per batch on the scheduler thread, `on_source_end(camera)` lets a
plugin close what it holds for a camera that stopped (a file that ended, a camera removed or paused), and `stop()`
releases everything. An instance whose config did not change outlives a reload; `check_cameras` lets it refuse the
new set of cameras it would serve.
Plugins only read and add to the frames they are given; they never call one another. What one needs from earlier
plugins it declares (`requires`, `provides`, words of `CAPABILITIES`), and loading a config checks, camera by camera,
that the chain gives it.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any, ClassVar, Generic, Literal, Protocol, TypeVar, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

from vigild.events import Event
from vigild.frame import Frame

PLUGIN_ID_PATTERN = r"^[A-Za-z0-9_-]+$"
MAX_NAME_LENGTH = 64
"""Longest camera name, plugin id, zone or line name: each is one segment of an event topic or a metric label."""


Placement = Literal["chain", "thread", "process"]
"""Where a plugin runs: in the chain, beside it on a thread, or beside it in a process (vigild.pipeline.placement)."""
_BRANCH: dict[bool | str, Placement] = {True: "thread", "thread": "thread", "process": "process", False: "chain"}
"""`branch:` values, the older spelling of `placement:`."""


class PluginConfig(BaseModel):
    """Base of every plugin's config. Subclasses set `type: Literal["name"] = "name"` and their own fields."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    admin_only: ClassVar[frozenset[str]] = frozenset()
    """Keys that name something the daemon loads or reads (a model, a labels file, a code path): only the config
    file an administrator writes may set them, never a control client's `cameras add/update`. Fields typed `Path`
    (or `FilePath`...) count without being listed; list the others (a `str` that may be a file, a back end)."""

    type: str
    id: str | None = Field(
        default=None,
        pattern=PLUGIN_ID_PATTERN,
        max_length=MAX_NAME_LENGTH,
        description="Name used by per-camera overrides; defaults to `type`.",
    )
    placement: Placement | None = Field(
        default=None,
        description="Where the plugin runs: `chain` (in order, on every frame; what it adds reaches the plugins after "
        "it), `thread` (beside the chain on a thread of its own, on the newest frames, never holding up the plugins "
        "after it: for work that releases the interpreter, such as a torch forward pass) or `process` (beside the "
        "chain in a process of its own: for work that holds the interpreter, which on a thread would take it from "
        "the chain). Default: the plugin's own choice (`Plugin.placements`, measured for each built-in plugin).",
    )
    branch: bool | Literal["thread", "process"] | None = Field(
        default=None,
        description="The older spelling of `placement`, still accepted: `true` or `thread` is `placement: thread`, "
        "`process` is `placement: process`, `false` is `placement: chain`.",
    )
    branch_share: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Beside the chain: the most of its time it may spend working; it rests between batches to keep to "
        "it, skipping (counted) what it has no time for. Default: 0.25 on a CPU (the chain keeps its cores), 1 on a "
        "GPU.",
    )

    @model_validator(mode="after")
    def _one_placement(self) -> PluginConfig:
        if self.placement is not None and self.branch is not None and _BRANCH[self.branch] != self.placement:
            raise ValueError(
                f"`placement: {self.placement}` and `branch: {self.branch}` say different things: keep `placement:`"
            )
        return self

    @property
    def requested_placement(self) -> Placement | None:
        """Where this entry asks the plugin to run (`placement:`, else `branch:`), or None for the plugin's default."""
        if self.placement is not None:
            return self.placement
        return _BRANCH[self.branch] if self.branch is not None else None

    @classmethod
    def admin_only_keys(cls) -> frozenset[str]:
        """`admin_only` of this class and its bases, and every field whose type is a path."""
        declared = frozenset().union(*(getattr(base, "admin_only", frozenset()) for base in cls.__mro__))
        paths = {name for name, field in cls.model_fields.items() if _mentions_path(field.annotation)}
        return declared | paths


def _mentions_path(annotation: Any) -> bool:
    """Whether `annotation` is a path type, or holds one (`Path | None`, `list[Path]`...)."""
    if isinstance(annotation, type) and issubclass(annotation, PurePath):
        return True
    return any(_mentions_path(arg) for arg in get_args(annotation))


def _unpublished(event: Event) -> None:
    logging.getLogger("vigild.plugin").debug("no publisher: dropping %s", event.type)


@dataclass(frozen=True)
class PluginContext:
    """What the daemon tells a plugin about its surroundings."""

    device: str
    """Resolved compute device: `cpu` or `cuda:N`."""
    cameras: Mapping[str, Any] = field(default_factory=dict)
    """Config of each camera this plugin instance serves, by name."""
    torch_threads: int | None = None
    placement: Placement = "chain"
    """Where its entry places it (`placement:`, else the plugin's default). The chain acts on it, except for a plugin
    that `keeps_order`, which reads it to place its own slow part."""
    publish: Callable[[Event], None] = _unpublished
    """Where a plugin that `keeps_order` sends the events its own worker makes (thread-safe: the daemon's bus)."""


class BranchWork(Protocol):
    """What the daemon shows of work that runs beside the chain (status `branch`, metrics): a `Branch`, or the
    worker of a plugin that `keeps_order`."""

    unit: str
    """What `pending` and `skipped_total` count: `frames`, `clips`..."""

    @property
    def pending(self) -> int: ...
    @property
    def skipped_total(self) -> int: ...
    @property
    def busy_s(self) -> float: ...
    @property
    def pid(self) -> int | None:
        """The process it works in, when not the daemon's (`placement: process`)."""
        ...


def check_torchvision_weights(value: str | None) -> str | None:
    """A plugin's `weights` for a torchvision model: `DEFAULT` (the pretrained weights), an existing state-dict file,
    or None (random weights, for benchmarks)."""
    if value not in (None, "DEFAULT") and not Path(value).is_file():
        raise ValueError(f"weights file not found: {value} (or use DEFAULT, or null for random weights)")
    return value


MAX_LIST_FILE_BYTES = 1 << 20
"""Largest names or labels file read (one entry a line): a bigger one is not what the key is for."""


def read_list_file(path: Path, key: str, what: str) -> tuple[str, ...]:
    """The non-blank lines of a names or labels file, stripped. A file that cannot be one (too large, not UTF-8
    text, NUL bytes, unreadable) raises `PluginConfigError(key, ...)` naming the file, never its content."""
    try:
        with path.open("rb") as file:
            data = file.read(MAX_LIST_FILE_BYTES + 1)
    except OSError as exc:
        raise PluginConfigError(key, f"cannot read {path}: {exc.strerror or type(exc).__name__}") from None
    if len(data) > MAX_LIST_FILE_BYTES:
        raise PluginConfigError(key, f"{path} is larger than {MAX_LIST_FILE_BYTES} bytes: not a {what} file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise PluginConfigError(key, f"{path} is not UTF-8 text: not a {what} file (one a line)") from None
    if "\0" in text:
        raise PluginConfigError(key, f"{path} holds NUL bytes: not a {what} file (one a line)")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


CAPABILITIES: Mapping[str, str] = {
    "detections": "a detector",
    "tracks": "a tracker",
    "segmentation": "a semantic segmenter",
    "actions": "an action recognizer",
}
"""The words of `Plugin.requires` and `Plugin.provides`, each with what usually provides it (for error messages).
`detections`: `frame.detections` holds the objects found on the frame; `tracks`: those detections carry tracker ids
(the objects are followed from frame to frame); `segmentation`: `frame.segmentation` holds a class map; `actions`: actions were
recognised (per track or per frame). A third-party plugin may use words of its own between its plugins."""

ConfigT = TypeVar("ConfigT", bound=PluginConfig)


class Plugin(ABC, Generic[ConfigT]):
    Config: ClassVar[type[PluginConfig]]
    batched: ClassVar[bool] = True
    """True: `process` gets whole batches. False: the chain hands it one frame at a time, so a failure costs exactly
    that frame."""
    repeatable: ClassVar[bool] = False
    """True for a plugin that is stateless per frame (a detector): running `process` again on frames it has already
    seen does no harm. After a batch raises, the chain then runs it again frame by frame so that only the bad frames
    are lost. False (the default, and what any plugin with state must keep): a batch that raises anything but
    `FrameErrors` fails whole, and the plugin's state must be as it was before the batch (compute, then commit) or
    the plugin must finish the rest of the batch and name its bad frames with `FrameErrors`."""
    requires: ClassVar[frozenset[str]] = frozenset()
    """What an earlier plugin of the chain must have added to a frame before this one sees it, for every camera this
    plugin runs for (see `CAPABILITIES` for the words). A chain that cannot give it, for some camera, is a config
    error naming the plugin's key and the camera."""
    provides: ClassVar[frozenset[str]] = frozenset()
    """What this plugin adds to the frames it processes, for later plugins (words of `CAPABILITIES`)."""
    placements: ClassVar[tuple[Placement, ...]] = ("chain",)
    """Where it can run (`placement:`), its default first. `chain`: in order, on every frame. `thread` and
    `process` (vigild.pipeline.placement): beside the chain, on the newest frame of each camera, skipping frames it
    cannot keep up with; its results are events only (nothing it adds to a frame reaches later plugins) and its
    `process` and `on_source_end` run on the branch's thread, or in a process of its own. Only a plugin whose
    results are events, and that keeps no state a skipped frame would break, may offer more than `chain`."""
    keeps_order: ClassVar[bool] = False
    """True for a plugin that, placed beside the chain, still runs `process` in the chain on every frame, in order
    (its cheap part) and places only its slow part where `context.placement` says, on a worker of its own that it
    starts, shows through `branch_work()` and whose events it sends to `context.publish` (the action recognizer cuts
    tubes in the chain and classifies clips beside it). False: the chain places the whole plugin."""
    camera_settings: ClassVar[type[BaseModel] | None] = None
    """A model of keys this plugin reads from each camera's own section (next to `source:`), which the core's camera
    settings keep as plain mappings: the analytics plugin's `zones:` and `lines:`. Loading validates every camera's
    keys with it, with the file and line, whenever the plugin is in `plugins:`; the camera's `resize` is passed as
    the validation context (`{"resize": (w, h) | None}`)."""

    @classmethod
    def requirements(cls, config: PluginConfig) -> frozenset[str]:
        """What this plugin needs with `config` (a camera's effective config): `requires` unless overridden by a
        plugin whose needs depend on its settings (the action recognizer needs tracks only in `mode: tracks`)."""
        return cls.requires

    def __init__(self, config: ConfigT, context: PluginContext):
        self.config = config
        self.context = context
        self.log = logging.getLogger(f"vigild.plugins.{config.id or config.type}")

    def start(self) -> None:
        """Load models and open resources. An exception here stops the daemon before any camera starts."""

    @abstractmethod
    def process(self, frames: list[Frame]) -> None:
        """Read and annotate `frames` (from one or more cameras) in place: set detections, append events."""

    def check_cameras(self, cameras: Mapping[str, Any]) -> None:
        """Raise `PluginConfigError` if this running instance cannot serve `cameras` (their configs by name);
        asked before a reload hands it a new set of cameras, so that a bad reload is refused whole."""

    def on_source_end(self, camera: str, ts_wall: float, frame_index: int) -> list[Event]:
        """`camera` will send no more frames (its file ended or the daemon stops): return the closing events."""
        return []

    def prefetch(self, frames: list[Frame]) -> Future[Any] | None:
        """Optional, for the first plugin of the chain: start the device work of `frames` (the next batch) now, on
        a thread of the plugin's own, while the scheduler finishes the batch before, and return its future (the
        scheduler looks at it only to know when it is done). `process` is then called with the same frames (the
        same objects, in order) and takes the result; with any other frames it computes as usual. Results must be
        exactly those of `process` alone. Default: nothing ahead (None)."""
        return None

    def branch_work(self) -> BranchWork | None:
        """A plugin that `keeps_order`: its worker beside the chain, while it has one."""
        return None

    def stop(self) -> None:
        """Release resources; called once, after the last `process`."""


class FrameErrors(Exception):
    """Raised by a batched plugin that finished the batch except for some frames: only those frames fail.

    `errors` maps a frame's position in the batch to what went wrong with it. The chain reports each with its
    camera and leaves those frames out of the rest of the chain, without running the batch again.
    """

    def __init__(self, errors: Mapping[int, Exception]):
        self.errors = dict(errors)
        super().__init__("; ".join(f"frame {i}: {exc}" for i, exc in self.errors.items()))


class PluginConfigError(ValueError):
    """Raised by `start()` when a setting turns out to be wrong only once the model is loaded (e.g. a class
    name the model does not know); the daemon reports it like any config error, with the key and exit code 2."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(message)

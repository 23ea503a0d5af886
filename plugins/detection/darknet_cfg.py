"""Darknet `.cfg` files read with bounds, for both darknet runtimes (the torch port and OpenCV DNN).

A cfg is a few hundred bytes that can ask for any amount of memory: `filters=4000000, size=64` is a 183 GiB kernel.
So before anything is allocated the cfg is walked once in plain integers: each layer's output shape (channels,
height, width) and parameter count from its options, every option bounded, the total compared with the weights
file's size (`check_weights`). A refusal names the file, the line and the option. The bounds (docs/models.md) are
far above any published darknet detector: Yolo-Fastest-1.1-XL at 320x320 has 0.92 M weights and 1.2 M values in
its largest layer output; YOLOv4 about 64 M weights and, at 608x608, 12 M values in its first layer's output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vigild.plugin import PluginConfigError

MAX_CFG_BYTES = 1 << 20
MAX_SECTIONS = 4096
MAX_FILTERS = 16384
"""Filters of a convolution, outputs of a connected layer, channels of a route."""
MAX_KERNEL = 32
"""Kernel size of a convolution or max pool (and its padding)."""
MAX_STRIDE = 32
MIN_SIDE, MAX_SIDE = 32, 8192
"""The input's width and height (multiples of 32), as for the detector's `input_size`."""
MAX_PARAMETERS = 1 << 28
"""Weights of the whole network: 1 GiB of float32."""
MAX_ACTIVATION = 1 << 28
"""Values in one layer's output for one frame: 1 GiB of float32."""
MAX_CLASSES = 10_000


class DarknetCfgError(PluginConfigError):
    """A cfg or weights file a darknet runtime cannot take: the message names the file, the section, line and option
    and why; `key` is the detector setting it came from (`cfg`, `weights` or `names`)."""

    def __init__(self, message: str, key: str = "cfg"):
        super().__init__(key, message)


@dataclass
class Section:
    kind: str
    options: dict[str, str] = field(default_factory=dict)
    line: int = 0

    lines: dict[str, int] = field(default_factory=dict)
    """The line of each option."""
    source: str = ""
    """The cfg file's path, as errors name it ('' for a cfg given as text)."""

    def error(self, message: str) -> DarknetCfgError:
        """`file: [kind] at line N: message`."""
        return DarknetCfgError(f"{self.where}[{self.kind}] at line {self.line}: {message}")

    @property
    def where(self) -> str:
        return f"{self.source}: " if self.source else ""

    def number(self, key: str, default: int | None = None) -> int:
        if key not in self.options:
            if default is None:
                raise self.error(f"`{key}` is missing")
            return default
        return self._parse(key, int)[0]

    def bounded(self, key: str, default: int | None, low: int, high: int) -> int:
        """`number`, refused with its line and key outside `low`..`high`."""
        value = self.number(key, default)
        if not low <= value <= high:
            raise self.option_error(key, f"expected {low} to {high}")
        return value

    def option_error(self, key: str, message: str) -> DarknetCfgError:
        """`file: line N: `key=value` in [kind]: message` (the section's line for an option it does not have)."""
        shown = f"`{key}={self.options[key]}`" if key in self.options else f"`{key}` (its default)"
        return DarknetCfgError(f"{self.where}line {self.lines.get(key, self.line)}: {shown} in [{self.kind}]: {message}")

    def ints(self, key: str) -> list[int]:
        return self._parse(key, int)

    def floats(self, key: str) -> list[float]:
        return self._parse(key, float)

    def _parse(self, key: str, kind: type[int] | type[float]) -> list[Any]:
        """The option's comma-separated values as `kind`; a value that is not one names the line and key."""
        text = self.options.get(key, "")
        try:  # an integer of more than 4300 digits is a ValueError too
            values: list[Any] | None = [kind(part) for part in text.split(",") if part.strip()]
        except ValueError:
            values = None
        if values is None or (text.strip() and not values) or (kind is float and not all(map(math.isfinite, values))):
            raise self.option_error(key, f"expected {'integers' if kind is int else 'numbers'}")
        return values


def read_cfg(path: Path) -> str:
    """The cfg file's text; one over MAX_CFG_BYTES or unreadable is refused naming it."""
    try:
        with path.open("rb") as file:
            data = file.read(MAX_CFG_BYTES + 1)
    except OSError as exc:
        raise DarknetCfgError(f"cannot read {path}: {exc.strerror or type(exc).__name__}") from None
    if len(data) > MAX_CFG_BYTES:
        raise DarknetCfgError(f"{path} is larger than {MAX_CFG_BYTES} bytes: not a darknet cfg")
    return data.decode("utf-8", errors="replace")


def parse_cfg(text: str, source: Path | str = "") -> list[Section]:
    """The cfg's sections in order (`[net]` first), options as written; comments dropped. At most MAX_SECTIONS."""
    sections: list[Section] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("["):
            if len(sections) == MAX_SECTIONS:
                raise DarknetCfgError(f"{source or 'the cfg'}: line {number}: more than {MAX_SECTIONS} sections")
            sections.append(Section(line.strip("[]").strip().lower(), line=number, source=str(source)))
        elif "=" in line and sections:
            key, value = (part.strip() for part in line.split("=", 1))
            sections[-1].options[key] = value
            sections[-1].lines[key] = number
    if not sections or sections[0].kind not in ("net", "network"):
        raise DarknetCfgError(f"{source}: a darknet cfg starts with a [net] section" if source else
                              "a darknet cfg starts with a [net] section")  # fmt: skip
    return sections


@dataclass(frozen=True)
class CfgPlan:
    net_size: tuple[int, int]
    """The cfg's (width, height)."""
    parameters: int
    """The weights the cfg needs (what its weights file must hold, in float32 values)."""


def plan_cfg(sections: list[Section], input_size: tuple[int, int] | None = None) -> CfgPlan:
    """The cfg walked in integers, every option bounded: its parameter count; each layer's output at `input_size`
    (default the cfg's) within MAX_ACTIVATION. Nothing is allocated."""
    net = sections[0]
    width, height = (net.bounded(key, 416, MIN_SIDE, MAX_SIDE) for key in ("width", "height"))
    for key, value in (("width", width), ("height", height)):
        if value % 32:
            raise net.option_error(key, "expected a multiple of 32")
    channels = net.number("channels", 3)
    if channels != 3:
        raise net.option_error("channels", "the detector feeds 3-channel frames")
    shape = (3, *(input_size[::-1] if input_size else (height, width)))
    shapes: list[tuple[int, int, int]] = []
    total = 0
    for index, section in enumerate(sections[1:]):
        shape, parameters = _layer(section, index, shape, shapes)
        total += parameters
        if total > MAX_PARAMETERS:
            raise section.error(f"the cfg needs {total} weights by this layer; at most {MAX_PARAMETERS}")
        if shape[0] * shape[1] * shape[2] > MAX_ACTIVATION:
            raise section.error(
                f"its output would hold {shape[0]}x{shape[1]}x{shape[2]} values a frame; at most {MAX_ACTIVATION}"
            )
        shapes.append(shape)
    return CfgPlan((width, height), total)


def _source(section: Section, key: str, value: int, index: int) -> int:
    absolute = value + index if value < 0 else value
    if not 0 <= absolute < index:
        raise section.option_error(key, "refers to a layer that is not before it")
    return absolute


def _layer(section: Section, index: int, shape: tuple[int, int, int],
           shapes: list[tuple[int, int, int]]) -> tuple[tuple[int, int, int], int]:  # fmt: skip
    """A layer's output shape and parameter count from the shape it reads."""
    channels, height, width = shape
    kind = section.kind
    if kind == "convolutional":
        filters = section.bounded("filters", None, 1, MAX_FILTERS)
        size = section.bounded("size", 1, 1, MAX_KERNEL)
        stride = section.bounded("stride", 1, 1, MAX_STRIDE)
        groups = section.bounded("groups", 1, 1, MAX_FILTERS)
        if channels % groups or filters % groups:
            raise section.option_error("groups", f"divides neither {channels} input channels nor {filters} filters")
        padding = size // 2 if section.number("pad", 0) else section.bounded("padding", 0, 0, MAX_KERNEL)
        height, width = ((side + 2 * padding - size) // stride + 1 for side in (height, width))
        norm = 4 if section.number("batch_normalize", 0) else 1  # biases, or beta, gamma, mean and variance
        parameters = filters * (channels // groups) * size * size + filters * norm
        channels = filters
    elif kind == "connected":
        outputs = section.bounded("output", 1, 1, MAX_FILTERS)
        parameters = channels * height * width * outputs + outputs * (4 if section.number("batch_normalize", 0) else 1)
        channels, height, width = outputs, 1, 1
    elif kind == "maxpool":
        size = section.bounded("size", 2, 1, MAX_KERNEL)
        stride = section.bounded("stride", 2, 1, MAX_STRIDE)
        padding = section.bounded("padding", size - 1, 0, MAX_KERNEL)
        height, width = ((side + padding - size) // stride + 1 for side in (height, width))
        parameters = 0
    elif kind == "upsample":
        stride = section.bounded("stride", 2, 1, MAX_STRIDE)
        height, width, parameters = height * stride, width * stride, 0
    elif kind == "reorg":
        stride = section.bounded("stride", 2, 1, MAX_STRIDE)
        channels, height, width, parameters = channels * stride * stride, height // stride, width // stride, 0
    elif kind == "route":
        sources = [_source(section, "layers", value, index) for value in section.ints("layers")]
        if not sources:
            raise section.option_error("layers", "names no layer")
        if len({shapes[source][1:] for source in sources}) != 1:
            raise section.option_error("layers", "joins outputs of different sizes")
        groups = section.bounded("groups", 1, 1, MAX_FILTERS)
        channels = sum(shapes[source][0] for source in sources) // groups
        (height, width), parameters = shapes[sources[0]][1:], 0
        if not 1 <= channels <= MAX_FILTERS * 4:
            raise section.option_error("layers", f"joins {channels} channels; at most {MAX_FILTERS * 4}")
    elif kind in ("shortcut", "sam", "scale_channels"):
        _source(section, "from", section.number("from"), index)
        parameters = 0
    elif kind == "avgpool":
        height, width, parameters = 1, 1, 0
    elif kind in ("yolo", "region"):
        classes = section.bounded("classes", 80 if kind == "yolo" else 20, 1, MAX_CLASSES)
        anchors = len(section.floats("anchors")) // 2
        if kind == "yolo" and channels != len(section.ints("mask") or range(anchors)) * (5 + classes):
            raise section.error(f"{channels} input channels for {len(section.ints('mask') or range(anchors))} "
                                f"anchors of {classes} classes (expected anchors x (5 + classes))")  # fmt: skip
        parameters = 0
    elif kind in ("dropout", "softmax"):
        parameters = 0
    else:
        raise section.error("this layer type is not supported")
    if height < 1 or width < 1:
        raise section.error(f"its output would be empty (from {shape[1]}x{shape[2]})")
    return (channels, height, width), parameters


def weights_header(path: Path, needed: int, exact: bool) -> int:
    """The size of the weights file's header, once its size is checked against the `needed` weights (exactly, or at
    least, as `exact` says; never more than MAX_PARAMETERS) before it is read."""
    try:
        size = path.stat().st_size
        with path.open("rb") as file:
            head = file.read(12)
    except OSError as exc:
        raise DarknetCfgError(f"cannot read {path}: {exc.strerror or type(exc).__name__}", "weights") from None
    if size < 20:
        raise DarknetCfgError(f"{path}: {size} bytes is too short for a darknet weights file", "weights")
    major, minor = (int.from_bytes(head[at : at + 4], "little", signed=True) for at in (0, 4))
    header = 12 + (8 if major * 10 + minor >= 2 else 4)
    count = (size - header) // 4
    if count > MAX_PARAMETERS or (count != needed if exact else count < needed):
        raise DarknetCfgError(f"{path}: holds {count} weights, the cfg needs {needed}", "weights")
    return header

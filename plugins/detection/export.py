"""`vigild export`: a detector's torch model (ultralytics, or the darknet port) as ONNX, with a dynamic batch axis.

The graph comes from torch's TorchScript-based exporter (`dynamo=False`, as ultralytics' own export: the dynamo
exporter needs onnxscript and gives the same graph for these models). The output is ultralytics' layout, and the
metadata is ultralytics' keys (`names`, `imgsz`, `task`, `kpt_shape`, `end2end`, `batch`) plus
`vigild.resize`, so that the ONNX back end (vigild.plugins.detection.onnx_runtime) reads a vigild export and an
ultralytics export alike. Exported in float32 from the CPU; `vigild quantize` makes the INT8 model from it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vigild.plugins.detection.onnx_runtime import RESIZE_KEY
from vigild.vision.letterbox import Resize

if TYPE_CHECKING:
    from vigild.plugins.detection.detector import DetectorConfig

OPSET = 17


@dataclass(frozen=True)
class Exportable:
    """A torch model in ultralytics' output layout and what the ONNX back end must know of it."""

    model: nn.Module
    task: str
    class_names: tuple[str, ...]
    input_size: tuple[int, int]
    resize: Resize
    kpt_shape: tuple[int, int] | None = None
    end2end: bool = False
    source: str = ""


class ExportError(ValueError):
    """A detector config that cannot be exported (an ONNX model already, say)."""


def exportable(config: DetectorConfig) -> Exportable:
    """The torch model a detector config loads, on the CPU in float32."""
    if config.resolved_backend == "onnx":
        raise ExportError(f"{config.weights} is an ONNX model already")
    if config.resolved_backend == "darknet":
        from vigild.plugins.detection.darknet import read_names
        from vigild.plugins.detection.darknet_torch import darknet_layout

        assert config.cfg is not None  # the config validator guarantees it
        layout = darknet_layout(config.cfg, Path(config.weights), None)
        names = read_names(config.names, layout.classes)
        size = config.input_size or layout.darknet.net_size
        return Exportable(layout, "detect", names, size, "stretch", source=f"{config.cfg.name} + {config.weights}")
    from vigild.plugins.detection.yolo import load_ultralytics

    loaded = load_ultralytics(config.weights, config.input_size)
    return Exportable(loaded.model, loaded.task, loaded.class_names, loaded.input_size, "letterbox",
                      loaded.kpt_shape, loaded.end2end, config.weights)  # fmt: skip


def metadata(model: Exportable) -> dict[str, str]:
    width, height = model.input_size
    meta = {
        "task": model.task,
        "names": repr(dict(enumerate(model.class_names))),
        "imgsz": repr([height, width]),
        "batch": "dynamic",
        "end2end": str(model.end2end),
        RESIZE_KEY: model.resize,
        "vigild.source": model.source,
    }
    if model.kpt_shape is not None:
        meta["kpt_shape"] = repr(list(model.kpt_shape))
    return meta


def export_onnx(model: Exportable, out: Path, opset: int = OPSET) -> Path:
    """Write `model` to `out` (batch axis dynamic, input size fixed) with its metadata."""
    import onnx

    width, height = model.input_size
    outputs = ["output0", "output1"] if model.task == "segment" else ["output0"]
    dynamic: dict[str, dict[int, str]] = {"images": {0: "batch"}, **{name: {0: "batch"} for name in outputs}}
    net = model.model.eval().float().cpu()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the tracer's notes on shapes it takes as constants: the size is fixed
        torch.onnx.export(net, (torch.zeros(1, 3, height, width),), str(out), opset_version=opset,
                          input_names=["images"], output_names=outputs, dynamic_axes=dynamic, dynamo=False)  # fmt: skip
    proto: Any = onnx.load(str(out))
    for key, value in metadata(model).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(out))
    return out

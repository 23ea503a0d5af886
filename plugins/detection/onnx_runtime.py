"""ONNX models on the detector (`weights: model.onnx`): ONNX Runtime runs the network, vigild's pipeline the rest.

The model is what ultralytics' `export(format="onnx")` writes for its detect, segment and pose models, or what
`vigild export` and `vigild quantize` write (vigild.plugins.detection.export): input `images` (B, 3, H, W) RGB 0-1,
output `output0` in ultralytics' layout (B, 4 + classes [+ mask coefficients | keypoints], anchors), and for segment
models `output1`, the mask prototypes. Both write the same metadata, which is read here: `names`, `imgsz` ([height,
width]), `task`, `kpt_shape`, `end2end`, and vigild's own `vigild.resize` (`letterbox` unless it says `stretch`, as
for darknet models). A model with a fixed batch size is run in chunks of that size.

Frames are letterboxed (or stretched) and NMS-ed exactly as for the torch models (`YoloBackend`): only the forward
pass differs. ONNX Runtime's CPU execution provider is what runs here, with the daemon's thread count (intra-op; one
inter-op thread: the graph runs sequentially). On `cuda:N` the CUDA execution provider is asked for when the
installed onnxruntime has it (`onnxruntime-gpu`); the batch then goes through host memory (no I/O binding) and this
path has never been run. TensorRT's provider is not used (docs/models.md).
"""

from __future__ import annotations

import ast
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vigild.plugin import PluginConfigError
from vigild.plugins.detection.yolo import YoloBackend
from vigild.vision.letterbox import Resize
from vigild.vision.masks import MaskFormat

log = logging.getLogger("vigild.plugins.onnx")

RESIZE_KEY = "vigild.resize"
MIN_SIDE, MAX_SIDE = 32, 8192
"""The input sizes a model may ask for (`imgsz`, or fixed in its graph), as for the detector's `input_size`."""
MAX_KEYPOINTS = 1000
MAX_CLASSES = 10_000
MAX_BATCH = 256
"""A fixed batch size (each batch is padded to it)."""
MAX_SHAPE_TEXT = 100
"""Characters of `imgsz` and `kpt_shape` metadata read at most."""
MAX_NAMES_TEXT = 1 << 20
MAX_METADATA_ENTRIES = 1000


class OnnxModelError(PluginConfigError):
    """An ONNX file the detector cannot run (its `weights`): the message names the file and what is wrong."""

    def __init__(self, message: str):
        super().__init__("weights", message)


@dataclass(frozen=True)
class OnnxModelInfo:
    task: str
    class_names: tuple[str, ...]
    input_size: tuple[int, int]
    """(width, height)."""
    resize: Resize
    kpt_shape: tuple[int, int] | None
    end2end: bool
    batch: int | None
    """The model's fixed batch size, or None for a dynamic batch axis."""


def session_options(threads: int | None) -> Any:
    """The daemon's thread policy for ONNX Runtime: `threads` for each operator, the graph run sequentially."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or 0  # 0: ONNX Runtime's own choice (one per core)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: its warnings about unused initialisers are not the user's
    # its threads sleep between batches instead of spinning: the cores are shared with capture, trackers and the rest
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def providers_for(device: str) -> list[Any]:
    """CUDA's provider on `cuda:N` when this onnxruntime has it (then the CPU's for what it lacks); else the CPU's."""
    import onnxruntime as ort

    parsed = torch.device(device)
    if parsed.type == "cuda":
        if "CUDAExecutionProvider" in ort.get_available_providers():
            return [("CUDAExecutionProvider", {"device_id": parsed.index or 0}), "CPUExecutionProvider"]
        log.warning("this onnxruntime has no CUDA execution provider (install onnxruntime-gpu): the CPU runs the model")
    return ["CPUExecutionProvider"]


def open_session(path: Path, device: str, threads: int | None) -> Any:
    """An inference session for `path`; a file ONNX Runtime cannot read raises `OnnxModelError` saying so.

    The file is parsed by `onnx` (Python's protobuf) and checked first: ONNX Runtime's own parser, and the checker's
    C++ one, abort the whole process on some malformed files (seen here on random bytes), where Python's raises.
    External data is looked for beside the model (not in the working directory), and data outside the model's
    directory (`../`, an absolute path, a symbolic link) is refused (`check_external_data`)."""
    import onnx
    import onnxruntime as ort

    try:
        # Python's protobuf parses, and the checker gets the parsed model, never the path: given a path, its C++ side
        # parses the file and resolves external data itself, and it aborted the whole process in a CI run (a model
        # whose external data pointed outside its directory). External data is checked here, beside the model.
        model = onnx.load(str(path), load_external_data=False)
        check_external_data(model, path)
        onnx.load_external_data_for_model(model, str(path.parent))  # (checked: files beside the model)
        onnx.checker.check_model(model)
        del model
    except Exception as exc:  # DecodeError, ValidationError, OSError...
        raise OnnxModelError(f"{path}: not a valid ONNX model: {first_line(exc)}") from None
    try:
        return ort.InferenceSession(str(path), session_options(threads), providers=providers_for(device))
    except Exception as exc:  # onnxruntime raises its own classes (InvalidProtobuf, Fail, NoSuchFile...)
        raise OnnxModelError(f"{path}: ONNX Runtime cannot load this model: {first_line(exc)}") from None


def check_external_data(model: Any, path: Path) -> None:
    """Every tensor kept outside the model file names a regular file in the model's own directory: a relative name
    with no `..`, not a symbolic link (ONNX Runtime then reads it beside the model, whatever the working directory);
    otherwise ValueError naming the tensor and the location."""
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    directory = path.parent.resolve()
    for tensor in _get_all_tensors(model):
        if not uses_external_data(tensor):
            continue
        location = ExternalDataInfo(tensor).location
        target = directory / location
        if not location or Path(location).is_absolute() or ".." in Path(location).parts:
            raise ValueError(f"tensor {tensor.name!r}: external data {location!r} is not a file beside the model")
        if target.is_symlink() or not target.is_file() or target.resolve().parent != directory:
            raise ValueError(
                f"tensor {tensor.name!r}: external data {location!r} is not a regular file in {directory} "
                "(a missing file, a directory or a symbolic link)"
            )


def first_line(exc: Exception) -> str:
    """An exception's first line, at most 300 characters (a library's message can be long), or its class's name."""
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def parse_names(text: str) -> tuple[str, ...]:
    """ultralytics' `names` metadata: the repr of a {id: name} dict (or a list), read as a literal, never run."""
    value = ast.literal_eval(text)
    if isinstance(value, dict):
        return tuple(str(value[i]) for i in range(len(value)))
    if isinstance(value, list | tuple):
        return tuple(str(v) for v in value)
    raise ValueError("expected a dict or a list")


def read_info(session: Any, path: Path, names: tuple[str, ...] | None, input_size: tuple[int, int] | None) -> OnnxModelInfo:
    """What the detector needs to know of the model, from its inputs, outputs and metadata; checked against them."""
    meta = session.get_modelmeta().custom_metadata_map
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or len(inputs[0].shape) != 4:
        raise OnnxModelError(f"{path}: expected one image input (batch, 3, height, width), got {_shapes(inputs)}")
    batch, channels, height, width = inputs[0].shape
    if isinstance(channels, int) and channels != 3:
        raise OnnxModelError(f"{path}: the input has {channels} channels, not 3")
    task = meta.get("task", "detect")
    if task not in ("detect", "segment", "pose"):
        raise OnnxModelError(f"{path}: a '{task}' model; the detector runs detect, segment and pose models")
    wanted_outputs = 2 if task == "segment" else 1
    if len(outputs) != wanted_outputs or len(outputs[0].shape) != 3:
        raise OnnxModelError(
            f"{path}: expected ultralytics' output layout for a {task} model ({wanted_outputs} output(s), the first "
            f"(batch, 4 + classes..., anchors)), got {_shapes(outputs)}"
        )
    model_names, imgsz, kpt = _metadata(meta, path, task)
    fixed = (width, height) if isinstance(width, int) and isinstance(height, int) else None
    if isinstance(batch, int) and not 1 <= batch <= MAX_BATCH:  # a fixed batch is padded to: its memory
        raise OnnxModelError(f"{path}: its batch is fixed at {batch}; from 1 to {MAX_BATCH} run")
    if fixed is not None and not all(MIN_SIDE <= side <= MAX_SIDE for side in fixed):
        raise OnnxModelError(f"{path}: its input is fixed at {list(fixed)}; sides from {MIN_SIDE} to {MAX_SIDE} run")
    if input_size is not None:
        if fixed is not None and fixed != input_size:
            raise OnnxModelError(f"{path}: its input is fixed at {list(fixed)}; input_size {list(input_size)} differs")
        size = input_size
    elif fixed is not None:
        size = fixed
    elif imgsz is not None:
        size = imgsz
    else:
        raise OnnxModelError(f"{path}: neither its input nor its metadata gives the input size: set input_size")
    end2end = str(meta.get("end2end", "False")) == "True"
    extra = 0 if task == "detect" else 32 if task == "segment" else int(np.prod(kpt or ()))
    rows = outputs[0].shape[2 if end2end else 1]
    found = names or model_names
    if isinstance(rows, int) and not end2end:
        classes = rows - 4 - extra
        if not 1 <= classes <= MAX_CLASSES:
            raise OnnxModelError(f"{path}: its output has {classes} classes; from 1 to {MAX_CLASSES} run")
        if found is None:
            found = tuple(str(i) for i in range(classes))
        if classes != len(found):
            raise OnnxModelError(f"{path}: its output has {classes} classes, the names give {len(found)}")
    if found is None:
        raise OnnxModelError(f"{path}: no class names in its metadata: give a names file")
    resize: Resize
    match meta.get(RESIZE_KEY, "letterbox"):
        case "letterbox":
            resize = "letterbox"
        case "stretch":
            resize = "stretch"
        case other:
            raise OnnxModelError(f"{path}: {RESIZE_KEY} is {other!r}, expected letterbox or stretch")
    return OnnxModelInfo(task, found, size, resize, kpt, end2end, batch if isinstance(batch, int) else None)


def _metadata(meta: dict[str, str], path: Path, task: str) -> tuple[tuple[str, ...] | None, tuple[int, int] | None,
                                                                  tuple[int, int] | None]:  # fmt: skip
    """`names`, `imgsz` as (width, height) and `kpt_shape` from the metadata, each bounded; a refusal names the file
    and the key."""
    if len(meta) > MAX_METADATA_ENTRIES:
        raise OnnxModelError(f"{path}: {len(meta)} metadata entries; at most {MAX_METADATA_ENTRIES}")
    for key in ("names", "imgsz", "kpt_shape"):
        if len(meta.get(key, "")) > (MAX_NAMES_TEXT if key == "names" else MAX_SHAPE_TEXT):
            raise OnnxModelError(f"{path}: metadata `{key}` is {len(meta[key])} characters long: not what it holds")
    try:
        key = "names"
        names = parse_names(meta["names"]) if "names" in meta else None
        key = "imgsz"
        imgsz = ast.literal_eval(meta["imgsz"]) if "imgsz" in meta else None
        key = "kpt_shape"
        kpt = ast.literal_eval(meta["kpt_shape"]) if task == "pose" else None
    except (ValueError, SyntaxError, KeyError, TypeError, RecursionError, MemoryError) as exc:  # the file's text
        raise OnnxModelError(f"{path}: metadata `{key}` cannot be read ({type(exc).__name__}: {first_line(exc)})") from None
    if task == "pose" and kpt is None:
        raise OnnxModelError(f"{path}: a pose model without `kpt_shape` in its metadata")
    if imgsz is not None and not _sides(imgsz, MIN_SIDE, MAX_SIDE, 32):  # [1e999, 640], [0, 0], [-64, 640]...
        raise OnnxModelError(f"{path}: metadata `imgsz` is {meta['imgsz'][:60]!r}: expected "
                             f"[height, width], multiples of 32 from {MIN_SIDE} to {MAX_SIDE}")  # fmt: skip
    if kpt is not None and not (_sides(kpt, 1, MAX_KEYPOINTS, 1) and kpt[1] in (2, 3)):
        raise OnnxModelError(f"{path}: metadata `kpt_shape` is {meta['kpt_shape'][:60]!r}: expected [keypoints, 2 or 3] "
                             f"with at most {MAX_KEYPOINTS} keypoints")  # fmt: skip
    return names, (imgsz[1], imgsz[0]) if imgsz else None, (kpt[0], kpt[1]) if kpt else None  # imgsz: [h, w]


def _sides(value: object, low: int, high: int, multiple: int) -> bool:
    """Whether `value` is a pair of integers (not booleans, not floats) from `low` to `high`, multiples of `multiple`."""
    return (isinstance(value, list | tuple) and len(value) == 2
            and all(type(v) is int and low <= v <= high and v % multiple == 0 for v in value))  # fmt: skip


def _shapes(values: list[Any]) -> str:
    return ", ".join(f"{value.name} {list(value.shape)}" for value in values) or "none"


class OrtModule(nn.Module):
    """An ONNX Runtime session as a module: (B, 3, H, W) float32 in, its outputs as tensors on the input's device.
    A model with a fixed batch size runs in chunks of that size, the last one padded."""

    def __init__(self, session: Any, batch: int | None, threads: int | None = None):
        super().__init__()
        self.session = session
        self.threads = threads
        """The session's intra-op threads (None: ONNX Runtime's choice)."""
        self.input_name = session.get_inputs()[0].name
        self.batch = batch

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        host = x.detach().to("cpu", torch.float32).contiguous().numpy()  # a view where it is already so (the CPU)
        if self.batch is None:
            outputs = self.session.run(None, {self.input_name: host})
        else:
            outputs = self._in_chunks(host, self.batch)
        tensors = tuple(torch.from_numpy(out).to(x.device) for out in outputs)
        return tensors[0] if len(tensors) == 1 else tensors

    def _in_chunks(self, host: np.ndarray, size: int) -> list[np.ndarray]:
        parts: list[list[np.ndarray]] = []
        for start in range(0, len(host), size):
            chunk = host[start : start + size]
            count = len(chunk)
            if count < size:
                chunk = np.concatenate([chunk, np.zeros((size - count, *chunk.shape[1:]), chunk.dtype)])
            parts.append([out[:count] for out in self.session.run(None, {self.input_name: chunk})])
        return [np.concatenate(outs) for outs in zip(*parts, strict=True)]


class OnnxBackend(YoloBackend):
    """`YoloBackend` with ONNX Runtime for the forward pass; its batch in NCHW float32, as the session takes it."""

    channels_last = False
    model: OrtModule


def onnx_backend(
    weights: Path,
    names: tuple[str, ...] | None,
    input_size: tuple[int, int] | None,
    confidence: float,
    nms_iou: float,
    device: str,
    threads: int | None,
    mask_format: MaskFormat = "polygon",
) -> OnnxBackend:
    session = open_session(weights, device, threads)
    info = read_info(session, weights, names, input_size)
    on_gpu = session.get_providers()[0] == "CUDAExecutionProvider"
    return OnnxBackend(
        OrtModule(session, info.batch, threads),
        info.task,
        info.class_names,
        info.input_size,
        confidence,
        nms_iou,
        device if on_gpu else "cpu",  # where the pre-processing runs: where the session reads its input
        False,
        mask_format,
        info.kpt_shape,
        info.end2end,
        weights.name,
        info.resize,
    )

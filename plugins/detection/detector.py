"""Object detector plugin: one model serves every camera of its group, a batch of frames per call.

Three back ends behind one interface:
- `ultralytics`: YOLOv8/YOLO11 detect, segment and pose models (a `.pt` file, a model name, or an architecture
  `.yaml`) on vigild's batched device pipeline;
- `darknet`: a `.cfg` + `.weights` (Yolo-Fastest, YOLOv3/v4-tiny...), ported to torch on the same pipeline with
  frames stretched as darknet trained them (`runtime: torch`, the default on CUDA), or through OpenCV DNN
  (`runtime: opencv`, the default on the CPU);
- `onnx`: an `.onnx` model (ultralytics' exports, `vigild export` and `vigild quantize`) through ONNX Runtime.
Left out, `backend` follows the files: `cfg:` → darknet, a `.onnx` weights file → onnx, else ultralytics. A frame
that cannot be a model input fails alone; the rest of the batch goes on.

With the scheduler's pipeline (`scheduler.pipeline`), the next batch is detected whole on the plugin's forward
thread (`prefetch`) while the scheduler finishes the batch before; `process` then takes that result.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, ClassVar, Literal

import numpy as np
from pydantic import BeforeValidator, Field, FilePath, ValidationInfo, field_validator

from vigild.cpus import process_cpus
from vigild.events import Event, object_payload
from vigild.frame import Detections, Frame
from vigild.plugin import FrameErrors, Plugin, PluginConfig, PluginConfigError
from vigild.plugins.detection.backend import DetectorBackend
from vigild.vision.device import default_half
from vigild.vision.letterbox import sort_frames
from vigild.vision.regions import join_crops, plan_crops

Size = Annotated[int, Field(gt=0, le=8192, multiple_of=32)]


def _square(value: object) -> object:
    return (value, value) if isinstance(value, int | str) else value


class DetectorConfig(PluginConfig):
    type: Literal["detector"] = "detector"
    admin_only: ClassVar[frozenset[str]] = frozenset({"backend", "cfg", "names", "weights", "runtime"})
    backend: Literal["ultralytics", "darknet", "onnx"] | None = Field(
        None, description="Default: darknet with a cfg, onnx for a .onnx weights file, else ultralytics."
    )
    cfg: FilePath | None = Field(None, validate_default=True, description="darknet: the network's .cfg file.")
    weights: str = Field(description="A weights file; for ultralytics also a model name such as yolov8n.pt.")
    names: FilePath | None = Field(
        None, description="darknet, onnx: class names, one a line (e.g. coco.names); onnx models carry their own."
    )
    runtime: Literal["torch", "opencv"] | None = Field(
        None,
        description="darknet: torch (vigild's batched device pipeline, any device; the default on CUDA) or opencv "
        "(OpenCV DNN; the default on the CPU).",
    )
    classes: list[str | int] | None = Field(None, description="Keep only these classes (names or ids); default all.")
    confidence: float = Field(0.25, ge=0, le=1)
    nms_iou: float = Field(0.45, ge=0, le=1)
    input_size: Annotated[tuple[Size, Size], BeforeValidator(_square)] | None = Field(
        None,
        description="Network input, one side or [width, height], multiples of 32; every frame is letterboxed into it "
        "(stretched, for darknet models). Default: 640x640 (ultralytics), the cfg's size (darknet), the model's (onnx). "
        "For 16:9 cameras [640, 384] halves the work.",
    )
    half: bool | None = Field(
        None,
        description="Reduced precision: fp16 on CUDA (default on there), bf16 on the CPU (default off; fast on CPUs "
        "with AVX512-BF16 or AMX).",
    )
    mask_format: Literal["polygon", "rle"] = Field(
        "polygon", description="Segment models: instance masks in events as polygons or COCO RLE (docs/events.md)."
    )
    publish: bool = Field(
        False, description="Publish a `detections` event per frame with every object (without a tracker, too)."
    )

    @field_validator("cfg")
    @classmethod
    def _cfg_for_darknet(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is None and info.data.get("backend") == "darknet":
            raise ValueError("required when backend is darknet (the network's .cfg file)")
        if value is not None and info.data.get("backend") not in (None, "darknet"):
            raise ValueError(f"a darknet .cfg, but backend is {info.data.get('backend')}")
        return value

    @field_validator("weights")
    @classmethod
    def _weights_exist(cls, value: str, info: ValidationInfo) -> str:
        path = Path(value)
        if path.is_file():
            return value
        if info.data.get("backend") in ("darknet", "onnx") or "/" in value or path.exists() or value.endswith(".onnx"):
            raise ValueError(f"weights file not found: {value}")
        return value  # a bare model name: ultralytics resolves it (downloads it where online)

    @field_validator("names", "runtime", "half")
    @classmethod
    def _fits_the_backend(cls, value: object, info: ValidationInfo) -> object:
        if value is None or "weights" not in info.data:
            return value
        backend = backend_of(info.data.get("backend"), info.data.get("cfg"), info.data["weights"])
        if info.field_name == "runtime" and backend != "darknet":
            raise ValueError(f"only for the darknet back end (this detector's is {backend})")
        if info.field_name == "half" and value and backend == "onnx":
            raise ValueError("an ONNX model runs in the precision it was exported or quantized in (vigild quantize)")
        if info.field_name == "names" and backend == "ultralytics":
            raise ValueError("ultralytics models carry their class names")
        return value

    @property
    def resolved_backend(self) -> Backend:
        """`backend`, or the one its files call for."""
        return backend_of(self.backend, self.cfg, self.weights)


Backend = Literal["ultralytics", "darknet", "onnx"]


def default_darknet_runtime(device: str) -> Literal["torch", "opencv"]:
    """The port on CUDA (batched, fp16: what OpenCV's pip wheels cannot do); OpenCV DNN on the CPU, where the two run
    at about the same speed and OpenCV DNN holds steadier memory (docs/models.md#darknet)."""
    return "torch" if device.startswith("cuda") else "opencv"


def backend_of(backend: Backend | None, cfg: Path | None, weights: str) -> Backend:
    if backend is not None:
        return backend
    if cfg is not None:
        return "darknet"
    return "onnx" if weights.lower().endswith(".onnx") else "ultralytics"


class Detector(Plugin[DetectorConfig]):
    Config = DetectorConfig
    repeatable = True  # stateless per frame: after a failed batch the chain reruns it frame by frame
    provides = frozenset({"detections"})

    def start(self) -> None:
        config = self.config
        backend = self._backend(config)
        if config.classes is not None:
            names_file = config.names
            backend.class_filter = self._class_ids(config.classes, backend.class_names, names_file)
        self.backend = backend
        self._masks = getattr(backend, "task", "detect") == "segment"
        """Instance masks are made for the frame the model saw: a segment model detects whole frames, never crops
        (`detect: regions` is ignored for it, docs/motion.md)."""
        self._lock = threading.Lock()
        self._ahead: ThreadPoolExecutor | None = None
        self._prefetched: dict[tuple[int, ...], Future[list[Detections]]] = {}
        """Batches started ahead, by the ids of their frames (the scheduler starts one before it finishes the one
        before: two at a time)."""
        self.log.info(
            "%s detector %s on %s for %s",
            config.resolved_backend + (f" ({config.runtime})" if config.runtime else ""),
            config.weights,
            self.context.device,
            ", ".join(self.context.cameras),
        )

    def _backend(self, config: DetectorConfig) -> DetectorBackend:
        device = self.context.device
        half = config.half if config.half is not None else default_half(device)
        backend = config.resolved_backend
        if backend == "darknet":
            assert config.cfg is not None  # the config validator guarantees it
            from vigild.plugins.detection.darknet import DarknetBackend, DarknetSpec

            spec = DarknetSpec(config.cfg, Path(config.weights), config.names, config.input_size, config.confidence,
                               config.nms_iou, device, half)  # fmt: skip
            if (config.runtime or default_darknet_runtime(device)) == "opencv":
                return DarknetBackend(spec)
            from vigild.plugins.detection.darknet_torch import darknet_backend

            return darknet_backend(spec)
        if backend == "onnx":
            from vigild.plugins.detection.darknet import read_names
            from vigild.plugins.detection.onnx_runtime import onnx_backend

            names = read_names(config.names) if config.names is not None else None
            threads = self.context.torch_threads or process_cpus()
            return onnx_backend(Path(config.weights), names, config.input_size, config.confidence, config.nms_iou,
                                device, threads, config.mask_format)  # fmt: skip
        from vigild.plugins.detection.yolo import YoloBackend

        return YoloBackend.load(
            config.weights, config.input_size, config.confidence, config.nms_iou, device, half, config.mask_format
        )

    @staticmethod
    def _class_ids(classes: list[str | int], names: tuple[str, ...], names_file: Path | None = None) -> np.ndarray:
        """Ids of `classes` in the model's `names` (read from `names_file`, if any)."""
        ids = []
        for wanted in classes:
            if isinstance(wanted, int):
                if not 0 <= wanted < len(names):
                    raise PluginConfigError(
                        "classes", f"class id {wanted} is out of range (the model has {len(names)} classes)"
                    )
                ids.append(wanted)
            elif wanted in names:
                ids.append(names.index(wanted))
            elif names_file is not None:  # its lines are a file's content: never shown, whatever file it is
                raise PluginConfigError(
                    "classes", f"the model has no class '{wanted}' (its names file {names_file} has {len(names)} names)"
                )
            else:
                sample = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
                raise PluginConfigError("classes", f"the model has no class '{wanted}' (it has: {sample})")
        return np.array(sorted(set(ids)), np.int64)

    def prefetch(self, frames: list[Frame]) -> Future[list[Detections]] | None:
        """Detect `frames` on the plugin's forward thread (the scheduler's pipeline): letterbox, upload, forward
        pass, NMS and mapping back, all of it, so `process` on the same frames only takes the result."""
        positions, _ = sort_frames([frame.image for frame in frames])
        good = [frames[position] for position in positions]
        if not good:
            return None
        if self._ahead is None:
            threads = self.context.torch_threads
            self._ahead = ThreadPoolExecutor(1, f"forward-{self.config.id or self.config.type}",
                                             initializer=_forward_thread, initargs=(threads, self.context.device))  # fmt: skip
        future = self._ahead.submit(self._detect_frames, good)
        self._prefetched[tuple(map(id, good))] = future
        while len(self._prefetched) > MAX_AHEAD:  # started and never asked for (the chain was replaced meanwhile)
            self._prefetched.pop(next(iter(self._prefetched))).cancel()  # not run, if it has not begun
        return future

    def _detect(self, images: list[np.ndarray]) -> list[Detections]:
        with self._lock:  # the back end reuses buffers (the letterbox's staging): one batch at a time
            return self.backend.detect(images)

    def _detect_frames(self, frames: list[Frame]) -> list[Detections]:
        """Each frame whole, or, where the motion gate gives regions (`detect: regions`), the crops around them
        (views of the frame: no copies) in the same batch, their detections joined back (vigild.vision.regions).
        Sets `frame.motion.crops`."""
        plans = [self._crops(frame) for frame in frames]
        if all(plan is None for plan in plans):
            return self._detect([frame.image for frame in frames])
        images: list[np.ndarray] = []
        for frame, plan in zip(frames, plans, strict=True):
            if plan is None:
                images.append(frame.image)
            else:
                images.extend(frame.image[y0:y1, x0:x1] for x0, y0, x1, y1 in plan.tolist())
        found = self._detect(images)
        results: list[Detections] = []
        at = 0
        for frame, plan in zip(frames, plans, strict=True):
            if plan is None:
                results.append(found[at])
                at += 1
            else:
                results.append(join_crops(found[at : at + len(plan)], plan, frame.size, self.config.nms_iou))
                at += len(plan)
        return results

    def _crops(self, frame: Frame) -> np.ndarray | None:
        motion = frame.motion
        if motion is None or motion.regions is None or self._masks:
            return None
        plan = plan_crops(motion.regions, frame.size, self.backend.input_size, motion.full_above)
        motion.crops = 0 if plan is None else len(plan)
        return plan

    def stop(self) -> None:
        ahead = getattr(self, "_ahead", None)  # (none if start failed)
        if ahead is not None:
            ahead.shutdown(wait=True, cancel_futures=True)

    def process(self, frames: list[Frame]) -> None:
        positions, rejected = sort_frames([frame.image for frame in frames])
        good = [frames[position] for position in positions]
        if good:
            ahead = self._prefetched.pop(tuple(map(id, good)), None)
            # a batch started ahead: its exception, if any, is the batch's (the chain reruns it frame by frame)
            found = ahead.result() if ahead is not None else self._detect_frames(good)
            for frame, detections in zip(good, found, strict=True):
                frame.detections = detections
            if self.config.publish:  # after every frame has its detections: a failure here costs one frame
                for position, frame in zip(positions, good, strict=True):
                    try:
                        event = detections_event(frame)
                    except Exception as exc:
                        rejected[position] = exc
                        continue
                    frame.events.append(event)
        if rejected:
            raise FrameErrors(rejected)


MAX_AHEAD = 4
"""Batches started ahead kept at most: the oldest beyond were never asked for."""


def _forward_thread(threads: int | None, device: str) -> None:
    """The forward thread does the chain's torch work: the chain's thread count (kept per calling thread) and, on
    CUDA, a stream of its own (torch's current stream is per thread too): its uploads and kernels do not queue behind
    the GPU work other threads put on the default stream (tube cuts, a segmenter branch), and theirs not behind it.
    Nothing crosses streams: a detection ends with its results copied to the host, which waits for the stream, and
    the pinned staging buffer is guarded by a host-side wait on an event (vigild.vision.letterbox.CopyFence)."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    if device.startswith("cuda"):
        torch.cuda.set_stream(torch.cuda.Stream(torch.device(device)))


def detections_event(frame: Frame) -> Event:
    detections = frame.detections
    return Event(
        "detections",
        frame.camera,
        frame.ts_wall,
        frame.index,
        data={"objects": [object_payload(detections, i) for i in range(len(detections))]},
    )

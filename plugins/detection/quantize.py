"""`vigild quantize`: an INT8 ONNX model of a camera's detector, calibrated on that camera's own frames.

1. The detector is picked from the config (`--plugin`, or the only one serving the camera) with the camera's
   effective settings, and its fp32 ONNX model made (`vigild export`'s, or its `.onnx` weights as they are).
2. The camera's source (a file, or a live stream through the same capture back end as the daemon) gives
   `--frames` frames for calibration, then `--holdout` more that the calibration never sees.
3. ONNX Runtime's static quantization (QDQ, per-channel weights, MinMax calibration on the frames pre-processed as
   the detector does) quantizes the convolutions and matrix products of the network, as ultralytics' INT8 ONNX
   export does. The decoding after them (sigmoid, exp, anchors, the concatenation of box pixels with scores) stays in
   float: one INT8 scale across pixels (0-640) and scores (0-1) would round every score away. So do the head's last
   convolutions (the ones whose output reaches the model's outputs through no other convolution): their raw box
   offsets go through exp, where an INT8 step is a few percent of the box.
4. Agreement of the INT8 model with the fp32 one on the held-back frames, the fp32 boxes taken as the reference:
   precision, recall and F1 of boxes at confidence 0.25 (of the detector's `classes`, where it has them), matched
   one to one within a class at IoU >= 0.5 (by the Hungarian method on IoU), per class and overall; and frames per
   second of both, measured one after the other.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torchvision.ops import box_iou

from vigild.config.loading import Config
from vigild.frame import Detections
from vigild.plugins.detection.detector import Detector, DetectorConfig
from vigild.plugins.detection.onnx_runtime import OnnxBackend, onnx_backend

MIN_FRAMES = 10
"""Fewer calibration frames than this cannot stand for a camera's scenes."""
AGREEMENT_CONFIDENCE = 0.25
AGREEMENT_IOU = 0.5
QUANTIZED_OPS = frozenset({"Conv", "Gemm", "MatMul"})
TARGET_F1 = 0.95
FLOAT_PREFIXES = (0, 4, 8, 12, 16, 24)
"""Convolutions from the input kept in float, tried in this order (`quantize_model`)."""


class QuantizeError(ValueError):
    """Wrong input to `vigild quantize` (a camera that does not exist, too few frames...): the message says what."""


@dataclass(frozen=True)
class Chosen:
    plugin: str
    config: DetectorConfig
    """The detector's settings for the camera (its overrides applied)."""


def choose_detector(config: Config, camera: str | None, plugin: str | None) -> Chosen:
    """The detector `plugin` (or the config's only one), with `camera`'s settings when a camera is named."""
    if camera is not None and camera not in config.settings.cameras:
        known = ", ".join(config.settings.cameras) or "none"
        raise QuantizeError(f"{config.file} has no camera '{camera}' (it has: {known})")
    detectors = [spec for spec in config.chain if isinstance(spec.config, DetectorConfig)]
    if not detectors:
        raise QuantizeError(f"{config.file} has no detector plugin")
    if plugin is not None:
        named = [spec for spec in config.chain if spec.id == plugin]
        if not named:
            ids = ", ".join(spec.id for spec in detectors)
            raise QuantizeError(f"{config.file} has no plugin '{plugin}' (its detectors: {ids})")
        if not isinstance(named[0].config, DetectorConfig):
            raise QuantizeError(f"plugin '{plugin}' is a {named[0].config.type}, not a detector")
        detectors = named
    elif len(detectors) > 1:
        ids = ", ".join(spec.id for spec in detectors)
        raise QuantizeError(f"{config.file} has several detectors ({ids}): say which with --plugin")
    spec = detectors[0]
    effective = spec.config if camera is None else spec.per_camera.get(camera)
    if effective is None:
        raise QuantizeError(f"detector '{spec.id}' does not serve camera '{camera}' (is the camera enabled?)")
    assert isinstance(effective, DetectorConfig)
    return Chosen(spec.id, effective)


def collect_frames(config: Config, camera: str, count: int, timeout: float = 10.0) -> list[np.ndarray]:
    """Up to `count` consecutive frames of the camera's source, each its own copy (fewer at a file's end)."""
    from vigild.capture.camera import make_reader
    from vigild.capture.reader import EndOfStream, SourceError

    backend = config.backends([camera])[camera]
    reader = make_reader(camera, config.settings.cameras[camera], config.source(camera), backend)
    frames: list[np.ndarray] = []
    try:
        reader.open()
        while len(frames) < count:
            raw = reader.read(timeout)
            if raw is None:
                raise QuantizeError(f"camera '{camera}' gave no frame for {timeout:.0f} s (after {len(frames)})")
            frames.append(np.array(raw.image, copy=True))
    except EndOfStream:
        pass
    except SourceError as exc:
        raise QuantizeError(f"camera '{camera}': {exc}") from None
    finally:
        reader.close()
    return frames


def head_convolutions(graph: Any) -> set[str]:
    """Names of the convolutions whose outputs reach the graph's outputs through no other convolution."""
    producer = {output: node for node in graph.node for output in node.output}
    found: set[str] = set()
    seen: set[str] = set()
    stack = [output.name for output in graph.output]
    while stack:
        tensor = stack.pop()
        node = producer.get(tensor)
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type == "Conv":
            found.add(node.name)
            continue
        stack.extend(node.input)
    return found


def excluded_nodes(graph: Any, float_prefix: int = 0) -> list[str]:
    """What stays in float: every node but the convolutions and matrix products, the head's last convolutions, and
    the first `float_prefix` convolutions in the graph's order (from the input)."""
    heads = head_convolutions(graph)
    first = {node.name for node in [n for n in graph.node if n.op_type in QUANTIZED_OPS][:float_prefix]}
    return [node.name for node in graph.node if node.op_type not in QUANTIZED_OPS or node.name in heads | first]


class CalibrationFrames:
    """ONNX Runtime's calibration input: the frames pre-processed as the detector does, one at a time (its
    histogram calibrators need equal shapes)."""

    def __init__(self, backend: OnnxBackend, frames: list[np.ndarray], input_name: str):
        self.backend, self.frames, self.input_name = backend, frames, input_name
        self._batches: Iterator[dict[str, np.ndarray]] = self._make()

    def _make(self) -> Iterator[dict[str, np.ndarray]]:
        for frame in self.frames:
            batch, _ = self.backend.letterbox([frame])
            yield {self.input_name: batch.contiguous().numpy()}

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)

    def rewind(self) -> None:
        self._batches = self._make()


def quantize_graph(prepared: Path, reference: OnnxBackend, frames: list[np.ndarray], out: Path, float_prefix: int) -> None:
    """ONNX Runtime's static quantization of `prepared` (QDQ, per-channel INT8 weights, UINT8 activations, MinMax
    calibration on `frames`)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationFrames, CalibrationDataReader):
        pass

    quantize_static(
        str(prepared),
        str(out),
        Reader(reference, frames, reference.model.input_name),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=excluded_nodes(onnx.load(str(prepared)).graph, float_prefix),
    )


@dataclass(frozen=True)
class Search:
    float_prefix: int
    """Convolutions from the input kept in float."""
    steps: list[tuple[int, float]]
    """(float prefix tried, F1 agreement on calibration frames) in the order tried."""


def quantize_model(
    fp32: Path,
    reference: OnnxBackend,
    frames: list[np.ndarray],
    out: Path,
    target: float = TARGET_F1,
    work: Path | None = None,
) -> Search:
    """Quantize `fp32` into `out`, calibrated on `frames`.

    The first convolutions of a small network (few channels at full resolution, depthwise ones most of all) lose the
    most to INT8. When the INT8 model's agreement with fp32 falls below `target` on calibration frames (half of
    them calibrate a trial, the other half measure it; the held-back frames are never used), the first
    convolutions are kept in float, a few more each trial (`FLOAT_PREFIXES`), until it reaches the target or the
    prefixes run out (then the best one tried). The model is then quantized with all the frames."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="vigild-quantize-", dir=work) as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        # onnx's shape inference and ONNX Runtime's graph optimisation, as ONNX Runtime advises before quantizing
        # (its symbolic shape inference gives up on the dynamic batch axis of these graphs, and is not needed)
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        half = len(frames) // 2
        trial_frames, check_frames = frames[:half], frames[half:]
        expected = detect_all(reference, check_frames)
        steps: list[tuple[int, float]] = []
        for prefix in FLOAT_PREFIXES:
            trial = Path(scratch) / f"trial-{prefix}.onnx"
            quantize_graph(prepared, reference, trial_frames, trial, prefix)
            candidate = onnx_backend(trial, reference.class_names, reference.input_size, reference.confidence,
                                     reference.nms_iou, "cpu", reference.model.threads)  # fmt: skip
            candidate.class_filter = reference.class_filter
            f1 = agreement(expected, detect_all(candidate, check_frames), reference.class_names).overall.f1
            steps.append((prefix, f1))
            if f1 >= target:
                break
        chosen = max(steps, key=lambda step: (step[1] >= target, -step[0] if step[1] >= target else step[1]))[0]
        quantize_graph(prepared, reference, frames, out, chosen)
    copy_metadata(fp32, out)
    return Search(chosen, steps)


def detect_all(backend: OnnxBackend, frames: list[np.ndarray], batch: int = 8) -> list[Detections]:
    return [found for start in range(0, len(frames), batch) for found in backend.detect(frames[start : start + batch])]


def copy_metadata(source: Path, target: Path) -> None:
    """The quantized model keeps the fp32 model's metadata (names, input size, resize): the detector reads it."""
    import onnx

    meta = {prop.key: prop.value for prop in onnx.load(str(source), load_external_data=False).metadata_props}
    model = onnx.load(str(target))
    present = {prop.key for prop in model.metadata_props}
    for key, value in {**meta, "vigild.quantized": "int8 qdq per-channel"}.items():
        if key not in present:
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
    onnx.save(model, str(target))


@dataclass
class ClassAgreement:
    name: str
    reference: int = 0
    """Boxes of the fp32 model."""
    found: int = 0
    """Boxes of the INT8 model."""
    matched: int = 0

    @property
    def precision(self) -> float:
        return self.matched / self.found if self.found else 1.0

    @property
    def recall(self) -> float:
        return self.matched / self.reference if self.reference else 1.0

    @property
    def f1(self) -> float:
        total = self.reference + self.found
        return 2 * self.matched / total if total else 1.0


@dataclass
class Agreement:
    overall: ClassAgreement = field(default_factory=lambda: ClassAgreement("all"))
    classes: dict[int, ClassAgreement] = field(default_factory=dict)


def agreement(
    reference: list[Detections], candidate: list[Detections], names: tuple[str, ...], iou: float = AGREEMENT_IOU
) -> Agreement:
    """Boxes of `candidate` matched one to one to those of `reference`, within a frame and a class, at IoU >= `iou`."""
    result = Agreement()
    for ref, cand in zip(reference, candidate, strict=True):
        for cls in np.union1d(ref.class_id, cand.class_id).tolist():
            a, b = ref.xyxy[ref.class_id == cls], cand.xyxy[cand.class_id == cls]
            row = result.classes.setdefault(cls, ClassAgreement(names[cls] if cls < len(names) else str(cls)))
            matched = 0
            if len(a) and len(b):
                overlap = box_iou(torch.from_numpy(a).double(), torch.from_numpy(b).double()).numpy()
                rows, cols = linear_sum_assignment(overlap, maximize=True)
                matched = int((overlap[rows, cols] >= iou).sum())
            for counts in (row, result.overall):
                counts.reference += len(a)
                counts.found += len(b)
                counts.matched += matched
    return result


def frames_per_second(backend: OnnxBackend, frames: list[np.ndarray], batch: int = 4) -> float:
    batch = min(batch, len(frames))
    backend.detect(frames[:batch])  # warm-up
    start = time.perf_counter()
    done = 0
    for first in range(0, len(frames) - batch + 1, batch):
        backend.detect(frames[first : first + batch])
        done += batch
    return done / (time.perf_counter() - start)


@dataclass
class Report:
    plugin: str
    camera: str
    calibration_frames: int
    held_back: int
    out: Path
    agreement: Agreement
    fp32_fps: float
    int8_fps: float
    search: Search

    def lines(self) -> list[str]:
        overall = self.agreement.overall
        out = [
            f"wrote {self.out} (INT8, QDQ, per-channel): detector '{self.plugin}', calibrated on {self.calibration_frames} "
            f"frames of camera '{self.camera}'",
            f"convolutions kept in float from the input: {self.search.float_prefix} (F1 on calibration frames by "
            f"prefix: {', '.join(f'{prefix}: {f1:.3f}' for prefix, f1 in self.search.steps)})",
            f"agreement with fp32 on {self.held_back} held-back frames (boxes at confidence {AGREEMENT_CONFIDENCE}, "
            f"IoU >= {AGREEMENT_IOU}, per class):",
            f"  {'class':<16} {'fp32':>6} {'int8':>6} {'match':>6} {'prec':>6} {'recall':>6} {'F1':>6}",
        ]
        rows = sorted(self.agreement.classes.values(), key=lambda row: -row.reference)
        for row in [*rows, overall]:
            out.append(
                f"  {row.name[:16]:<16} {row.reference:>6} {row.found:>6} {row.matched:>6} "
                f"{row.precision:>6.3f} {row.recall:>6.3f} {row.f1:>6.3f}"
            )
        out.append(
            f"speed on this machine (ONNX Runtime, batches of 4): fp32 {self.fp32_fps:.1f} frames/s, INT8 "
            f"{self.int8_fps:.1f} frames/s ({self.int8_fps / self.fp32_fps:.2f}x)"
        )
        return out


def quantize(
    config: Config,
    camera: str,
    plugin: str | None,
    out: Path,
    frames: int = 300,
    holdout: int = 100,
    threads: int | None = None,
) -> Report:
    if frames < MIN_FRAMES:
        raise QuantizeError(f"--frames {frames}: calibrating needs at least {MIN_FRAMES} frames")
    if holdout < 1:
        raise QuantizeError(f"--holdout {holdout}: the agreement needs at least 1 held-back frame")
    chosen = choose_detector(config, camera, plugin)
    detector = chosen.config
    with tempfile.TemporaryDirectory(prefix="vigild-quantize-") as work:
        if detector.resolved_backend == "onnx":
            fp32 = Path(detector.weights)
        else:
            from vigild.plugins.detection.export import export_onnx, exportable

            fp32 = export_onnx(exportable(detector), Path(work) / "fp32.onnx")
        names = None
        if detector.names is not None:
            from vigild.plugins.detection.darknet import read_names

            names = read_names(detector.names)
        settings = (names, detector.input_size, AGREEMENT_CONFIDENCE, detector.nms_iou, "cpu", threads)
        reference = onnx_backend(fp32, *settings)
        if detector.classes is not None:  # the agreement of what the detector keeps
            reference.class_filter = Detector._class_ids(detector.classes, reference.class_names, detector.names)
        got = collect_frames(config, camera, frames + holdout)
        if len(got) < frames + holdout:
            raise QuantizeError(
                f"camera '{camera}' gave {len(got)} frames before its end: {frames} for calibration and {holdout} "
                f"held back need {frames + holdout} (lower --frames or --holdout)"
            )
        calibration, held = got[:frames], got[frames:]
        search = quantize_model(fp32, reference, calibration, out, work=Path(work))
        int8 = onnx_backend(out, *settings)
        int8.class_filter = reference.class_filter
        result = agreement(detect_all(reference, held), detect_all(int8, held), reference.class_names)
        fp32_fps = frames_per_second(reference, held)
        int8_fps = frames_per_second(int8, held)
    return Report(chosen.plugin, camera, frames, holdout, out, result, fp32_fps, int8_fps, search)

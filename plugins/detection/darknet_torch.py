"""Darknet `.cfg` + `.weights` detectors (Yolo-Fastest-1.1 and -XL) as a torch module, on the device pipeline.

The layer types their cfgs use: `convolutional` (groups, batch_normalize, leaky or linear), `shortcut`, `route`,
`upsample`, `maxpool`, `dropout` (nothing at inference) and `yolo`. The output is OpenCV DNN's for the same blob, so
the decoding in darknet.py serves both: per frame, rows of `cx, cy, w, h` (fractions of the input), objectness, and
each class's score times the objectness, zeroed below the cfg's `thresh` as OpenCV's region layer does (darknet.py
sets `thresh` to the detector's confidence). Rows are ordered as OpenCV orders them: by head, then cell (row-major),
then anchor.

Weights are darknet's file as written by its trainer: a header (major, minor, revision, then images seen as 64 bits
from version 0.2 on), then per convolution its biases (or batch-norm beta), batch-norm gamma, mean and variance, and
its kernel. A file that does not hold exactly what the cfg asks for is refused with the counts. The cfg is walked
and bounded (darknet_cfg.py) and the weights file's size compared with it before any tensor is made.

`darknet_backend` runs it as the detector's `darknet` back end (`runtime: torch`): `YoloLayout` gives its output
ultralytics' layout, so that the batched pipeline of vigild.plugins.detection.yolo (one upload, one NMS a batch,
any device) serves it, with frames stretched to the input as darknet trained them; exported to ONNX, the same layout
is what the ONNX Runtime back end reads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from vigild.plugins.detection.darknet import DarknetSpec, read_names
from vigild.plugins.detection.darknet_cfg import DarknetCfgError, Section, parse_cfg, plan_cfg, read_cfg, weights_header
from vigild.plugins.detection.yolo import YoloBackend

LEAKY_SLOPE = 0.1
BN_EPS = 1e-6  # darknet adds .000001 to the variance (normalize_cpu); so does OpenCV's importer


class _Conv(nn.Module):
    def __init__(self, section: Section, channels: int):
        super().__init__()
        filters, size, stride = section.number("filters"), section.number("size", 1), section.number("stride", 1)
        groups = section.number("groups", 1)
        padding = size // 2 if section.number("pad", 0) else section.number("padding", 0)
        self.batch_normalize = bool(section.number("batch_normalize", 0))
        self.conv = nn.Conv2d(channels, filters, size, stride, padding, groups=groups, bias=not self.batch_normalize)
        self.bn = nn.BatchNorm2d(filters, eps=BN_EPS) if self.batch_normalize else None
        activation = section.options.get("activation", "linear")
        if activation not in ("leaky", "linear"):
            raise section.error(f"activation {activation!r} is not supported")
        self.leaky = activation == "leaky"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return F.leaky_relu(x, LEAKY_SLOPE, inplace=True) if self.leaky else x

    def fuse(self) -> None:
        """Fold the batch norm into the convolution (inference only): one operation less per layer."""
        if self.bn is not None:
            self.conv = fuse_conv_bn_eval(self.conv.eval(), self.bn.eval())
            self.bn = None


class _Yolo(nn.Module):
    anchors: torch.Tensor

    def __init__(self, section: Section):
        super().__init__()
        pairs = np.array(section.floats("anchors"), np.float32).reshape(-1, 2)
        mask = section.ints("mask") or list(range(len(pairs)))
        if any(not 0 <= m < len(pairs) for m in mask):
            raise section.error("`mask` names an anchor it does not have")
        self.classes = section.number("classes", 80)
        self.scale_x_y = float(section.floats("scale_x_y")[0]) if "scale_x_y" in section.options else 1.0
        self.thresh: float | None = section.floats("thresh")[0] if "thresh" in section.options else 0.2
        """Scores at or below it are zeroed (OpenCV's region layer; 0.2 its default); None: none are."""
        self.register_buffer("anchors", torch.from_numpy(pairs[mask]))  # in input pixels

    def forward(self, x: torch.Tensor, input_wh: torch.Tensor) -> torch.Tensor:
        """`input_wh`: (2,) float32, the network input's width and height (anchors are in its pixels)."""
        batch, _, rows, cols = x.shape
        anchors = len(self.anchors)
        x = x.float()  # the decoding in float32 (bfloat16 would keep a 320-pixel coordinate to about a pixel only)
        x = x.view(batch, anchors, 5 + self.classes, rows, cols).permute(0, 3, 4, 1, 2)  # N, row, col, anchor, k
        ys, xs = torch.meshgrid(torch.arange(rows, device=x.device), torch.arange(cols, device=x.device), indexing="ij")
        grid = torch.stack((xs, ys), -1).to(x.dtype)[None, :, :, None, :]  # 1, row, col, 1, (x, y)
        scale = torch.tensor([cols, rows], dtype=x.dtype, device=x.device)
        xy = (torch.sigmoid(x[..., 0:2]) * self.scale_x_y - (self.scale_x_y - 1) / 2 + grid) / scale
        wh = torch.exp(x[..., 2:4]) * (self.anchors / input_wh)
        objectness = torch.sigmoid(x[..., 4:5])
        scores = torch.sigmoid(x[..., 5:]) * objectness
        if self.thresh is not None:
            scores = torch.where(scores > self.thresh, scores, torch.zeros_like(scores))
        return torch.cat((xy, wh, objectness, scores), -1).reshape(batch, rows * cols * anchors, 5 + self.classes)


class DarknetModel(nn.Module):
    """The network a darknet cfg describes; `forward` takes the blob OpenCV's `blobFromImages` makes (N, 3, H, W,
    RGB, 0-1) and returns (N, rows, 5 + classes) as OpenCV DNN's forward does, all heads concatenated."""

    def __init__(self, cfg_text: str, cfg_path: Path | str = "", input_size: tuple[int, int] | None = None):
        """`cfg_path`: the cfg's path, as errors name it; `input_size`: (width, height) it will run at, if not the
        cfg's (layer outputs are bounded at that size)."""
        super().__init__()
        sections = parse_cfg(cfg_text, cfg_path)
        self.weight_count = plan_cfg(sections, input_size).parameters
        """The weights the cfg needs (bounded, as every option, before a tensor is made)."""
        net = sections[0]
        self.source = str(cfg_path)
        self.net_size = (net.number("width", 416), net.number("height", 416))
        channels = net.number("channels", 3)
        self.layers = nn.ModuleList()
        self.plan: list[tuple[str, list[int]]] = []
        """Per layer, its kind and the layers it reads (absolute indices)."""
        widths: list[int] = []
        for index, section in enumerate(sections[1:]):
            kind = section.kind
            sources: list[int] = []
            if kind == "convolutional":
                layer: nn.Module = _Conv(section, channels)
                channels = section.number("filters")
            elif kind == "shortcut":
                source = section.number("from")
                sources = [source + index if source < 0 else source]
                if section.options.get("activation", "linear") != "linear":
                    raise section.error("only a linear activation is supported")
                layer = nn.Identity()
            elif kind == "route":
                sources = [value + index if value < 0 else value for value in section.ints("layers")]
                if section.number("groups", 1) != 1:
                    raise section.error("groups are not supported")
                channels = sum(widths[source] for source in sources)
                layer = nn.Identity()
            elif kind == "upsample":
                layer = nn.Upsample(scale_factor=section.number("stride", 2), mode="nearest")
            elif kind == "maxpool":
                size, stride = section.number("size", 2), section.number("stride", 2)
                if stride != 1 or size % 2 == 0:
                    raise section.error("only odd sizes at stride 1 are supported")
                layer = nn.MaxPool2d(size, 1, size // 2)
            elif kind == "dropout":
                layer = nn.Identity()
            elif kind == "yolo":
                layer = _Yolo(section)
            else:
                raise section.error("this layer type is not supported")
            if any(not 0 <= source < index for source in sources):
                raise section.error("refers to a layer that is not before it")
            self.layers.append(layer)
            self.plan.append((kind, sources))
            widths.append(channels)
        self.kept = frozenset(source for _, sources in self.plan for source in sources)
        """Layers whose output a later layer reads (route, shortcut): only these are held through the forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_wh = torch.tensor([x.shape[3], x.shape[2]], dtype=torch.float32, device=x.device)
        outputs: dict[int, torch.Tensor] = {}
        heads = []
        for index, (layer, (kind, sources)) in enumerate(zip(self.layers, self.plan, strict=True)):
            if kind == "shortcut":
                x = x + outputs[sources[0]]
            elif kind == "route":
                x = outputs[sources[0]] if len(sources) == 1 else torch.cat([outputs[s] for s in sources], 1)
            elif kind == "yolo":
                heads.append(layer(x, input_wh))
            else:
                x = layer(x)
            if index in self.kept:  # every other layer's output is freed as soon as the next one has read it
                outputs[index] = x
        return torch.cat(heads, 1)

    def load_weights(self, path: Path) -> None:
        """darknet's weights file into the layers, checked to hold exactly what the cfg needs."""
        needed = self.weight_count
        header = weights_header(path, needed, exact=True)  # the size, before the file is read
        data = path.read_bytes()
        values = np.frombuffer(data[header : header + (len(data) - header) // 4 * 4], np.float32)
        if len(values) != needed:  # the file changed since
            raise DarknetCfgError(f"{path}: holds {len(values)} weights, the cfg needs {needed}", "weights")
        at = 0

        def take(tensor: torch.Tensor) -> None:
            nonlocal at
            count = tensor.numel()
            tensor.data.copy_(torch.from_numpy(values[at : at + count].copy()).view_as(tensor))
            at += count

        with torch.no_grad():
            for layer in self.layers:
                if not isinstance(layer, _Conv):
                    continue
                if layer.bn is not None:
                    take(layer.bn.bias)
                    take(layer.bn.weight)
                    assert layer.bn.running_mean is not None and layer.bn.running_var is not None
                    take(layer.bn.running_mean)
                    take(layer.bn.running_var)
                else:
                    assert layer.conv.bias is not None
                    take(layer.conv.bias)
                take(layer.conv.weight)


def load_darknet(cfg: Path, weights: Path, thresh: float | None = None,
                 input_size: tuple[int, int] | None = None) -> DarknetModel:  # fmt: skip
    """The model of `cfg` with `weights`, in eval mode; `thresh`: the YOLO heads' score floor (the detector's
    confidence), as darknet.py's `with_score_floor` sets it for OpenCV; `input_size` as for `DarknetModel`. The
    cfg's weights are counted and compared with the weights file's size before any tensor is made."""
    text = read_cfg(cfg)
    weights_header(weights, plan_cfg(parse_cfg(text, cfg), input_size).parameters, exact=True)
    model = DarknetModel(text, cfg, input_size)
    model.load_weights(weights)
    if thresh is not None:
        for layer in model.layers:
            if isinstance(layer, _Yolo):
                layer.thresh = thresh
    return model.eval()


class YoloLayout(nn.Module):
    """A darknet model's output in ultralytics' export layout: (B, 4 + classes, rows), the box as centre and size in
    input pixels, then each class's score (times the objectness), which `yolo.select` reads (and ONNX carries)."""

    def __init__(self, model: DarknetModel):
        super().__init__()
        self.darknet = model
        heads = [layer for layer in model.layers if isinstance(layer, _Yolo)]
        if not heads:
            raise DarknetCfgError(f"{model.source or 'the cfg'}: no [yolo] layer: it is not a detector")
        if len({head.classes for head in heads}) != 1:
            raise DarknetCfgError(f"{model.source or 'the cfg'}: its [yolo] layers disagree on the number of classes")
        self.classes = heads[0].classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.darknet(x)
        size = torch.tensor([x.shape[3], x.shape[2], x.shape[3], x.shape[2]], dtype=out.dtype, device=out.device)
        return torch.cat((out[..., :4] * size, out[..., 5:]), -1).transpose(1, 2)


def darknet_layout(cfg: Path, weights: Path, thresh: float | None,
                   input_size: tuple[int, int] | None = None) -> YoloLayout:  # fmt: skip
    """`load_darknet` in ultralytics' layout; `thresh` None: no score is zeroed (an export: the detector's own
    threshold comes after)."""
    model = load_darknet(cfg, weights, input_size=input_size)
    for layer in model.layers:
        if isinstance(layer, _Yolo):
            layer.thresh = thresh
        elif isinstance(layer, _Conv):
            layer.fuse()
    return YoloLayout(model).eval()


def darknet_backend(spec: DarknetSpec) -> YoloBackend:
    """The darknet model on vigild's device pipeline, frames stretched to its input as in training (the cfg's
    size unless `input_size`); `thresh` is the detector's confidence, as darknet.py sets it for OpenCV."""
    model = darknet_layout(spec.cfg, spec.weights, spec.confidence, spec.input_size)
    class_names = read_names(spec.names, model.classes)
    if len(class_names) != model.classes:
        raise DarknetCfgError(
            f"{spec.names} has {len(class_names)} names; the cfg's [yolo] layers have {model.classes}", "names"
        )
    size = spec.input_size or model.darknet.net_size
    return YoloBackend(model, "detect", class_names, size, spec.confidence, spec.nms_iou, spec.device, spec.half,
                       name=spec.cfg.name, resize="stretch")  # fmt: skip

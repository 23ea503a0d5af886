"""Video classifiers for the action recognizer: torchvision's 3D CNNs and video transformers, or a user's model.

A model comes with what it needs to be fed: clip length, crop size, normalisation and labels. For torchvision's
architectures these come from the weights' own metadata (Kinetics-400 recipes), so a fine-tuned state dict of the
same architecture is fed as its base model was; a TorchScript model states them in the config.
"""

from __future__ import annotations

import copy
import re
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from vigild.plugin import PluginConfigError, read_list_file

TORCHVISION_VIDEO_MODELS = ("r3d_18", "mc3_18", "r2plus1d_18", "s3d", "mvit_v1_b", "mvit_v2_s", "swin3d_t")
MAX_DEFAULT_CLIP_LEN = 32


class VideoModelError(ValueError):
    """A setting the model cannot work with; `key` names the config key to fix."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(message)


@dataclass(frozen=True)
class ClipSettings:
    """What the config sets of how clips are fed to the model; None: the model's own."""

    clip_len: int | None = None
    size: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None


@dataclass
class VideoModel:
    module: torch.nn.Module
    labels: tuple[str, ...]
    clip_len: int
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    min_clip_len: int = 1
    min_size: int = 1


def read_labels(path: Path) -> tuple[str, ...]:
    """One label per line; blank lines are ignored. Errors name the file, never its content."""
    try:
        labels = read_list_file(path, "labels", "labels")
    except PluginConfigError as exc:
        raise VideoModelError("labels", str(exc)) from None
    if not labels:
        raise VideoModelError("labels", f"{path} lists no labels")
    return labels


def _recipe(name: str) -> tuple[object, int, int, tuple[float, ...], tuple[float, ...], int, int]:
    """(weights enum member, clip_len, crop size, mean, std, min clip length, min size) of an architecture."""
    from torchvision.models import get_model_weights

    weights = get_model_weights(name).DEFAULT
    transforms = weights.transforms()
    meta = weights.meta
    documented = re.search(r"clip_len=(\d+)", meta.get("_docs", ""))
    min_len = int(meta.get("min_temporal_size") or 1)
    clip_len = int(documented.group(1)) if documented else 16
    if clip_len > MAX_DEFAULT_CLIP_LEN:  # s3d's evaluation used 128-frame clips; it takes any length from 14
        clip_len = max(16, min_len)
    min_size = int(meta.get("min_size", (1, 1))[0])
    return (
        weights,
        clip_len,
        int(transforms.crop_size[0]),
        tuple(transforms.mean),
        tuple(transforms.std),
        min_len,
        min_size,
    )


def load_video_model(
    model: str,
    weights: str | None,
    labels: Path | None,
    feed: ClipSettings,
) -> VideoModel:
    """`model`: a torchvision name (weights: `DEFAULT`, a state-dict path, or None for random weights) or a
    TorchScript file (labels required)."""
    if model in TORCHVISION_VIDEO_MODELS:
        return _load_torchvision(model, weights, labels, feed)
    path = Path(model)
    if path.suffix in {".pt", ".pth", ".ts", ".torchscript"} or path.exists():
        return _load_torchscript(path, weights, labels, feed)
    raise VideoModelError(
        "model", f"unknown video model {model!r}: expected one of {', '.join(TORCHVISION_VIDEO_MODELS)} "
        "or a TorchScript file"
    )  # fmt: skip


def _load_torchvision(
    name: str,
    weights: str | None,
    labels_file: Path | None,
    feed: ClipSettings,
) -> VideoModel:
    from torchvision.models import get_model

    enum_weights, own_len, own_size, own_mean, own_std, min_len, min_size = _recipe(name)
    kinetics: tuple[str, ...] = tuple(enum_weights.meta["categories"])  # type: ignore[attr-defined]
    labels = read_labels(labels_file) if labels_file is not None else kinetics
    if weights is not None and weights.upper() == "DEFAULT":
        if labels_file is not None and labels != kinetics:
            raise VideoModelError(
                "labels", f"weights: DEFAULT are {name}'s Kinetics-400 weights, with their own labels"
            )
        try:
            module = get_model(name, weights=enum_weights)
        except Exception as exc:  # offline, or a download that failed
            raise VideoModelError(
                "weights",
                f"could not get {name}'s Kinetics-400 weights ({type(exc).__name__}: {exc}); on a machine without "
                "internet give a local state dict: `weights: /path/to/state_dict.pt` and its `labels` file",
            ) from exc
    else:
        module = get_model(name, weights=None, num_classes=len(labels))
        if weights is not None:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state:
                state = state["state_dict"]
            head = _classifier_rows(state)
            if head is not None and head != len(labels):
                raise VideoModelError(
                    "labels",
                    f"the checkpoint {weights} classifies {head} classes but "
                    f"{labels_file if labels_file is not None else 'the Kinetics-400 label list'} lists {len(labels)}",
                )
            try:
                module.load_state_dict(state)
            except RuntimeError as exc:
                raise VideoModelError("weights", f"{weights} is not a {name} state dict: {exc}") from exc
    return VideoModel(
        module=module.eval(),
        labels=labels,
        clip_len=feed.clip_len or own_len,
        size=feed.size or own_size,
        mean=feed.mean or own_mean,  # type: ignore[arg-type]
        std=feed.std or own_std,  # type: ignore[arg-type]
        min_clip_len=min_len,
        min_size=min_size,
    )


def _classifier_rows(state: object) -> int | None:
    """Number of classes of a state dict: outputs of its last weight (the classification head: a linear layer, or
    s3d's 1x1x1 convolution)."""
    if not isinstance(state, dict):
        return None
    weights = [value for key, value in state.items() if key.endswith("weight") and getattr(value, "ndim", 0) >= 2]
    return int(weights[-1].shape[0]) if weights else None


def _load_torchscript(
    path: Path,
    weights: str | None,
    labels_file: Path | None,
    feed: ClipSettings,
) -> VideoModel:
    if not path.is_file():
        raise VideoModelError("model", f"{path} does not exist")
    if weights is not None:
        raise VideoModelError("weights", "a TorchScript model carries its weights; leave `weights` out")
    if labels_file is None:
        raise VideoModelError("labels", f"{path} is a TorchScript model: give its labels file in `labels`")
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise VideoModelError("model", f"{path} is not a TorchScript model: {exc}") from exc
    kinetics_mean, kinetics_std = (0.43216, 0.394666, 0.37645), (0.22803, 0.22145, 0.216989)
    return VideoModel(
        module=module.eval(),
        labels=read_labels(labels_file),
        clip_len=feed.clip_len or 16,
        size=feed.size or 112,
        mean=feed.mean or kinetics_mean,
        std=feed.std or kinetics_std,
    )


class ClipRunner:
    """Runs uint8 clips through a video model on its device, in the precision it will run in.

    The weights stay float32 and the clips are normalised in float32; `reduced` (float16, bfloat16) runs the
    model under `torch.autocast`, which computes convolutions and matrix products in the reduced type and keeps
    LayerNorm, softmax and reductions in float32 (a whole-model `.half()` would run a transformer's attention and
    LayerNorm in float16, where they can overflow).
    """

    def __init__(self, video: VideoModel, device: torch.device, reduced: torch.dtype | None):
        self.device = device
        self.reduced = reduced
        self.module = video.module.to(device)  # float32 weights; a module moves in place
        std = torch.tensor(video.std, dtype=torch.float32)
        self._scale = (1.0 / (255.0 * std)).view(1, 3, 1, 1, 1).to(device)
        self._shift = (torch.tensor(video.mean, dtype=torch.float32) / std).view(1, 3, 1, 1, 1).to(device)

    @property
    def precision(self) -> str:
        return "float32" if self.reduced is None else f"{str(self.reduced).removeprefix('torch.')} (autocast)"

    def in_float32(self) -> ClipRunner:
        """The same model and normalisation, without autocast."""
        plain = copy.copy(self)
        plain.reduced = None
        return plain

    def __call__(self, clips: torch.Tensor) -> torch.Tensor:
        """(K, 3, T, S, S) uint8 clips on the device -> (K, labels) float32 logits."""
        batch = clips.to(torch.float32).mul_(self._scale).sub_(self._shift)
        autocast = torch.autocast(self.device.type, dtype=self.reduced) if self.reduced is not None else nullcontext()
        with torch.inference_mode(), autocast:
            logits = self.module(batch)
        return logits.float()


def check_clip(video: VideoModel, run: ClipRunner) -> None:
    """Run one clip of the configured size through the model, on its device and in the precision it will run in:
    a size it cannot take, a head whose class count differs from the labels, or a model that fails or gives
    non-finite scores in reduced precision, becomes a config error now rather than on the first full tube."""
    if video.clip_len < video.min_clip_len:
        raise VideoModelError("clip_len", f"the model needs clips of at least {video.min_clip_len} frames")
    if video.size < video.min_size:
        raise VideoModelError("size", f"the model needs crops of at least {video.min_size} pixels")
    clip = torch.full((1, 3, video.clip_len, video.size, video.size), 128, dtype=torch.uint8, device=run.device)
    try:
        out = run(clip)
    except Exception as exc:
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if run.reduced is not None and _runs(run.in_float32(), clip):
            raise VideoModelError(
                "half",
                f"the model fails in {run.precision} on {run.device} but runs in float32 ({reason}); set `half: false`",
            ) from exc
        raise VideoModelError(
            "clip_len",
            f"the model cannot take clips of {video.clip_len} frames of {video.size}x{video.size}: {reason}",
        ) from exc
    if out.ndim != 2 or out.shape[1] != len(video.labels):
        raise VideoModelError(
            "labels", f"the model gives {tuple(out.shape[1:])} scores per clip but the labels list {len(video.labels)}"
        )
    if not torch.isfinite(out).all():
        raise VideoModelError(
            "half" if run.reduced is not None else "model",
            f"the model gives non-finite scores in {run.precision} on {run.device} for a grey clip"
            + ("; set `half: false`" if run.reduced is not None else ""),
        )


def _runs(run: ClipRunner, clip: torch.Tensor) -> bool:
    try:
        run(clip)
    except Exception:
        return False
    return True

"""A scene where only motion tells the actions apart, and a tiny 3D CNN trained on it.

Real pedestrians cut from vtest.avi's first frame are moved over the plaza's median background (no people in it):
one walks left, one walks right, one stands, one bobs up and down. A single frame cannot say which is which (the
same sprites are used for several actions); a stack of frames can. The model is trained, in seconds on a CPU, on
tubes cut by vigild's own tube cutter around the true boxes (with jitter, as a detector's boxes have), so it sees
what the plugin will give it: the person nearly still in the crop and the background moving past.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from conftest import plaza
from torch import nn

from vigild.plugins.actions.tubes import TubeCutter, square_boxes

ACTIONS = ("walk_left", "walk_right", "stand", "bob")
CLIP_LEN, SIZE, STRIDE, MARGIN = 8, 32, 3, 0.3
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
SPEED = 4.0  # pixels per frame
BOB = 24.0  # pixels, up and down


def position(action: str, start: tuple[float, float], i: int, speed: float = SPEED) -> tuple[float, float]:
    x, y = start
    if action == "walk_left":
        return x - speed * i, y
    if action == "walk_right":
        return x + speed * i, y
    if action == "bob":
        return x, y + BOB * np.sin(2 * np.pi * i / 24)
    return x, y


def render(
    people: list[tuple[str, int, tuple[float, float]]], frames: int, reverse: bool = False, speed: float = SPEED
):
    """people: (action, sprite number, start top-left); walkers move `speed` pixels a frame. Returns images and
    per frame {person: box}."""
    background, sprites = plaza()
    images, truths = [], []
    for i in range(frames):
        image = background.copy()
        truth = {}
        for person, (action, sprite_number, start) in enumerate(people):
            sprite = sprites[sprite_number]
            x, y = (round(v) for v in position(action, start, i, speed))
            h, w = sprite.shape[:2]
            image[y : y + h, x : x + w] = sprite
            truth[person] = (x, y, x + w, y + h)
        images.append(image)
        truths.append(truth)
    if reverse:
        images, truths = images[::-1], truths[::-1]
    return images, truths


SCENE = [  # action, sprite, start: four people in separate bands of the plaza
    ("walk_left", 0, (620.0, 60.0)),
    ("walk_right", 1, (120.0, 190.0)),
    ("stand", 0, (330.0, 330.0)),
    ("bob", 1, (560.0, 440.0)),
]
SCENE_FRAMES = 110


class TinyMotionNet(nn.Module):
    """Two 3D convolutions (3 frames each) and a linear head: direction of motion is in the temporal kernels."""

    def __init__(self, classes: int = len(ACTIONS)):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv3d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool3d((1, 2, 2)),
            nn.Conv3d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveMaxPool3d(1),
        )
        self.head = nn.Linear(32, classes)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(clips).flatten(1))


def training_clips(per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tubes cut around the true boxes, jittered, at random places and speeds: (N, 3, T, S, S) float, labels."""
    rng = np.random.default_rng(seed)
    cutter = TubeCutter(SIZE, torch.device("cpu"))
    background, sprites = plaza()
    height, width = background.shape[:2]
    clips, labels = [], []
    span = CLIP_LEN * STRIDE
    for label, action in enumerate(ACTIONS):
        for _ in range(per_class):
            sprite = sprites[int(rng.integers(0, 2))]
            h, w = sprite.shape[:2]
            speed = rng.uniform(3.0, 5.0)
            start = (rng.uniform(100, width - 100 - w), rng.uniform(30, height - h - 30))
            phase = int(rng.integers(0, 24))
            crops = []
            for t in range(span):
                if t % STRIDE:
                    continue
                x, y = position(action, start, t + phase, speed)
                x = float(np.clip(x, 0, width - w))
                image = background.copy()
                xi, yi = round(x), round(y)
                image[yi : yi + h, xi : xi + w] = sprite
                box = np.array([[xi, yi, xi + w, yi + h]], np.float32) + rng.normal(0, 1.5, (1, 4)).astype(np.float32)
                crops.append(cutter(image, square_boxes(box, MARGIN, width, height))[0])
            clips.append(torch.stack(crops, dim=1))  # (3, T, S, S)
            labels.append(label)
    data = torch.stack(clips).float()
    data = (data / 255 - torch.tensor(MEAN).view(1, 3, 1, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1, 1)
    return data, torch.tensor(labels)


TRAINING_STEPS = 600


def train(directory: Path, steps: int = TRAINING_STEPS) -> tuple[Path, Path]:
    """Train TinyMotionNet and save it as a user would: a TorchScript file and a labels file.

    A fixed number of steps from fixed seeds, never a time budget: on a busy machine the model is the same, only
    later."""
    torch.manual_seed(0)
    data, labels = training_clips(per_class=128, seed=1)
    model = TinyMotionNet()
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(2)
    for _ in range(steps):
        pick = torch.from_numpy(rng.choice(len(data), 32, replace=False))
        loss = nn.functional.cross_entropy(model(data[pick]), labels[pick])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    model_file, labels_file = directory / "motion.ts", directory / "motion.labels"
    torch.jit.script(model).save(str(model_file))
    labels_file.write_text("\n".join(ACTIONS) + "\n")
    return model_file, labels_file


def training_key() -> str:
    """What the trained model depends on: this scene, the tube cutter and torch (a cache key)."""
    import hashlib

    from vigild.plugins.actions import tubes

    digest = hashlib.sha256(
        Path(__file__).read_bytes() + Path(tubes.__file__).read_bytes() + torch.__version__.encode()
    )
    return digest.hexdigest()[:16]

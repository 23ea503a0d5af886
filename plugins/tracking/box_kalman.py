"""Constant-velocity Kalman filter on boxes, for many tracks at once.

The filter of ByteTrack and BoT-SORT (the same noise model as ultralytics' `KalmanFilterXYAH` and
`KalmanFilterXYWH`: state = box + its velocity, noise proportional to the box size), written for arrays of
tracks, (N, 8) means and (N, 8, 8) covariances, so that one predict and one update serve every track of every
camera in a batch. ultralytics updates track by track, one 4x4 solve each; here it is one batched solve.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

BoxForm = Literal["xyah", "xywh"]
"""xyah: centre, aspect ratio w/h and height (ByteTrack); xywh: centre, width and height (BoT-SORT)."""

_POSITION_WEIGHT = 1.0 / 20
_VELOCITY_WEIGHT = 1.0 / 160


class BoxKalman:
    def __init__(self, form: BoxForm):
        self.form = form

    def measure(self, ltwh: np.ndarray) -> np.ndarray:
        """(N, 4) float32 left-top-width-height -> the filter's float32 measurement."""
        out = ltwh.copy()
        out[:, :2] += out[:, 2:] / 2
        if self.form == "xyah":
            out[:, 2] /= out[:, 3]
        return out

    def boxes(self, mean: np.ndarray) -> np.ndarray:
        """(N, 8) states -> (N, 4) float64 xyxy."""
        out = mean[:, :4].copy()
        if self.form == "xyah":
            out[:, 2] *= out[:, 3]
        out[:, :2] -= out[:, 2:] / 2
        out[:, 2:] += out[:, :2]
        return out

    def _sizes(self, state: np.ndarray) -> np.ndarray:
        """(N, 4): the size each of the four box components' noise is proportional to."""
        if self.form == "xyah":
            return np.repeat(state[:, 3:4], 4, axis=1)
        return state[:, [2, 3, 2, 3]]

    def initiate(self, measurement: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = len(measurement)
        mean = np.zeros((n, 8))
        mean[:, :4] = measurement
        sizes = self._sizes(mean)
        std = np.concatenate([2 * _POSITION_WEIGHT * sizes, 10 * _VELOCITY_WEIGHT * sizes], axis=1)
        if self.form == "xyah":
            std[:, 2], std[:, 6] = 1e-2, 1e-5
        covariance = np.zeros((n, 8, 8))
        covariance[:, np.arange(8), np.arange(8)] = np.square(std)
        return mean, covariance

    def predict(self, mean: np.ndarray, covariance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        sizes = self._sizes(mean)
        std = np.concatenate([_POSITION_WEIGHT * sizes, _VELOCITY_WEIGHT * sizes], axis=1)
        if self.form == "xyah":
            std[:, 2], std[:, 6] = 1e-2, 1e-5
        mean = mean.copy()
        mean[:, :4] += mean[:, 4:]  # F @ mean, F = [[I, I], [0, I]]
        covariance = covariance.copy()  # F @ P @ F.T, by blocks
        covariance[:, :4, :] += covariance[:, 4:, :]
        covariance[:, :, :4] += covariance[:, :, 4:]
        covariance[:, np.arange(8), np.arange(8)] += np.square(std)
        return mean, covariance

    def update(
        self, mean: np.ndarray, covariance: np.ndarray, measurement: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        std = _POSITION_WEIGHT * self._sizes(mean)
        if self.form == "xyah":
            std[:, 2] = 1e-1
        projected = covariance[:, :4, :4].copy()
        projected[:, np.arange(4), np.arange(4)] += np.square(std)
        gain = np.linalg.solve(projected, covariance[:, :, :4].transpose(0, 2, 1)).transpose(0, 2, 1)  # (N, 8, 4)
        innovation = measurement - mean[:, :4]
        mean = mean + np.einsum("nij,nj->ni", gain, innovation)
        covariance = covariance - gain @ projected @ gain.transpose(0, 2, 1)
        return mean, covariance

    def warp(self, mean: np.ndarray, covariance: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Move states by a 2x3 camera-motion affine (BoT-SORT's compensation; xywh only): centres and their
        velocities rotate, sizes scale by |R|, the translation moves the centres."""
        rotation = affine[:2, :2]
        full = np.kron(np.eye(4), rotation)
        full[2:4, 2:4] = full[6:8, 6:8] = np.abs(rotation)
        mean = mean @ full.T
        mean[:, :2] += affine[:2, 2]
        return mean, full @ covariance @ full.T

"""VBench's two temporal formulas, on tensors (no model inside).

* Subject consistency (VBench ``subject_consistency``): with ``f_i`` the L2-normalised feature of frame i,
  ``score_i = (max(0, cos(f_{i-1}, f_i)) + max(0, cos(f_0, f_i))) / 2`` for i >= 1, and the video's score is
  the mean of ``score_i``. VBench uses DINO ViT-B/16 features; we use the features the caller gives.
* Temporal flickering (VBench ``temporal_flickering``): ``(255 - mean_i MAE(frame_i, frame_{i+1})) / 255``,
  the MAE over every pixel and channel of two consecutive uint8 frames, over all consecutive pairs.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def consistency_scores(features: torch.Tensor) -> torch.Tensor:
    """``[n, D]`` features -> ``[n - 1]`` per-frame scores ``score_i`` (frames 1..n-1) of VBench's formula."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"subject consistency needs at least 2 feature rows, got shape {tuple(features.shape)}")
    f = F.normalize(features.double(), dim=-1)
    to_previous = (f[1:] * f[:-1]).sum(-1).clamp_min(0.0)
    to_first = (f[1:] * f[:1]).sum(-1).clamp_min(0.0)
    return ((to_previous + to_first) / 2).float()


def frame_pair_mae(frames: np.ndarray | torch.Tensor, chunk: int = 8) -> np.ndarray:
    """``[n, H, W, 3]`` uint8 -> ``[n - 1]`` mean absolute difference of each consecutive pair (0..255)."""
    x = torch.as_tensor(np.asarray(frames) if not isinstance(frames, torch.Tensor) else frames)
    if x.dtype != torch.uint8:
        raise ValueError(f"temporal flickering reads uint8 frames (0..255), got {x.dtype}")
    out = []
    for start in range(0, x.shape[0] - 1, chunk):
        end = min(start + chunk, x.shape[0] - 1)
        a, b = x[start:end], x[start + 1:end + 1]
        diff = torch.maximum(a, b) - torch.minimum(a, b)  # |a - b| without leaving uint8
        out.append(diff.flatten(1).sum(1, dtype=torch.int64).double() / diff[0].numel())
    return torch.cat(out).numpy() if out else np.zeros(0)


def flickering_score(mae: np.ndarray) -> float:
    """VBench's video score from the per-pair MAEs: ``(255 - mean(mae)) / 255``."""
    return float((255.0 - float(np.mean(mae))) / 255.0)

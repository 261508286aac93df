"""Motion amplitude: the mean optical-flow magnitude between consecutive frames, in pixels per frame.

Two flow methods give it: OpenCV's Farneback (``cv2.calcOpticalFlowFarneback``, pyramid scale 0.5, 3 levels,
window 15, 3 iterations, poly_n 5, poly_sigma 1.2: the parameters OpenCV's own sample uses), when the optional
``opencv-python-headless`` is installed; otherwise our torch implementation: pyramidal Lucas-Kanade (3 levels,
7 x 7 window, 3 warping iterations per level; flow left at 0 where the window has no texture, i.e. the smaller
eigenvalue of its structure tensor is below ``MIN_EIGEN``). Both run on the luma of the frames scaled down
(area average) so that the long side is at most ``FLOW_MAX_SIDE``; the magnitudes are scaled back to the
video's pixels. The two methods do not give identical numbers: the JSON names the one used.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import torch
import torch.nn.functional as F

FLOW_MAX_SIDE = 160
LK_LEVELS, LK_WINDOW, LK_ITERATIONS = 3, 7, 3
MIN_EIGEN = 1e-5  # on intensities in 0..1 averaged over the window: below this the window is flat
FARNEBACK = dict(pyr_scale=0.5, levels=3, winsize=15, iterations=3, poly_n=5, poly_sigma=1.2, flags=0)
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, what OpenCV's RGB2GRAY uses
METHODS = {"farneback": "OpenCV Farneback (cv2.calcOpticalFlowFarneback)",
           "torch-lucas-kanade": "pyramidal Lucas-Kanade in torch (bindweave_core.evaluate.flow)"}


def default_method() -> str:
    return "farneback" if importlib.util.find_spec("cv2") is not None else "torch-lucas-kanade"


def luma(frames: np.ndarray | torch.Tensor, max_side: int = FLOW_MAX_SIDE) -> tuple[torch.Tensor, float]:
    """``[n, H, W, 3]`` uint8 -> (``[n, 1, h, w]`` luma in 0..1 with max(h, w) <= max_side, scale h / H)."""
    x = torch.as_tensor(np.asarray(frames))
    height, width = x.shape[1:3]
    scale = min(1.0, max_side / max(height, width))
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    weights = torch.tensor(LUMA).view(1, 3, 1, 1) / 255.0
    parts = []
    for start in range(0, x.shape[0], 8):  # a float copy of a whole 480p video is ~400 MB
        y = (x[start:start + 8].permute(0, 3, 1, 2).float() * weights).sum(1, keepdim=True)
        parts.append(F.interpolate(y, size=size, mode="area") if scale < 1.0 else y)
    return torch.cat(parts), size[0] / height


def _box(x: torch.Tensor) -> torch.Tensor:
    """Mean over the window (over its part inside the frame at the borders); separable, so two 1-D passes."""
    r = LK_WINDOW // 2
    x = F.avg_pool2d(x, (1, LK_WINDOW), stride=1, padding=(0, r), count_include_pad=False)
    return F.avg_pool2d(x, (LK_WINDOW, 1), stride=1, padding=(r, 0), count_include_pad=False)


def _gradients(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Central differences (one-sided at the borders), per pixel."""
    p = F.pad(a, (1, 1, 1, 1), mode="replicate")
    return (p[..., 1:-1, 2:] - p[..., 1:-1, :-2]) / 2, (p[..., 2:, 1:-1] - p[..., :-2, 1:-1]) / 2


def _warp(b: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """``b`` sampled at ``x + flow(x)`` (bilinear, border values repeated)."""
    h, w = b.shape[-2:]
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h, dtype=b.dtype), torch.linspace(-1, 1, w, dtype=b.dtype),
                            indexing="ij")
    offset = flow.permute(0, 2, 3, 1) * torch.tensor([2 / max(w - 1, 1), 2 / max(h - 1, 1)], dtype=b.dtype)
    grid = torch.stack([xs, ys], -1).unsqueeze(0) + offset
    return F.grid_sample(b, grid, mode="bilinear", padding_mode="border", align_corners=True)


def _lk_level(a: torch.Tensor, b: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    ix, iy = _gradients(a)
    sxx, sxy, syy = _box(ix * ix), _box(ix * iy), _box(iy * iy)
    det = sxx * syy - sxy * sxy
    half_trace = (sxx + syy) / 2
    min_eigen = half_trace - torch.sqrt(((sxx - syy) / 2) ** 2 + sxy * sxy)
    textured = (min_eigen > MIN_EIGEN).float()
    safe_det = torch.where(textured > 0, det, torch.ones_like(det))
    for _ in range(LK_ITERATIONS):
        it = _warp(b, flow) - a
        bx, by = _box(ix * it), _box(iy * it)
        du = -(syy * bx - sxy * by) / safe_det
        dv = -(sxx * by - sxy * bx) / safe_det
        flow = flow + torch.cat([du, dv], 1) * textured
    # No texture in the window at this scale: no evidence of motion here (else a coarse level's estimate
    # for a moving object would bleed into the flat background around it).
    return flow * textured


def lucas_kanade(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Dense flow ``[n, 2, h, w]`` (x, y in pixels) taking ``a`` to ``b`` (``b(x + flow) ~ a(x)``)."""
    pyramid = [(a, b)]
    for _ in range(LK_LEVELS - 1):
        pa, pb = pyramid[-1]
        if min(pa.shape[-2:]) < 2 * LK_WINDOW:
            break
        pyramid.append((F.avg_pool2d(pa, 2), F.avg_pool2d(pb, 2)))
    flow = torch.zeros(a.shape[0], 2, *pyramid[-1][0].shape[-2:], dtype=a.dtype)
    for pa, pb in reversed(pyramid):
        if flow.shape[-2:] != pa.shape[-2:]:
            ratio = torch.tensor([pa.shape[-1] / flow.shape[-1], pa.shape[-2] / flow.shape[-2]]).view(1, 2, 1, 1)
            flow = F.interpolate(flow, size=pa.shape[-2:], mode="bilinear", align_corners=False) * ratio
        flow = _lk_level(pa, pb, flow)
    return flow


def _farneback(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    import cv2

    out = []
    for x, y in zip(a[:, 0], b[:, 0]):
        prev = (x * 255).round().clamp(0, 255).to(torch.uint8).numpy()
        nxt = (y * 255).round().clamp(0, 255).to(torch.uint8).numpy()
        out.append(torch.from_numpy(cv2.calcOpticalFlowFarneback(prev, nxt, None, **FARNEBACK)).permute(2, 0, 1))
    return torch.stack(out)


def flow_field(a: torch.Tensor, b: torch.Tensor, method: str) -> torch.Tensor:
    """Flow ``[n, 2, h, w]`` from luma ``a`` to ``b`` (``[n, 1, h, w]`` in 0..1) with ``method``."""
    if method not in METHODS:
        raise ValueError(f"unknown flow method {method!r}; choose one of {sorted(METHODS)}")
    return _farneback(a, b) if method == "farneback" else lucas_kanade(a, b)


def motion_per_pair(frames: np.ndarray, ends: list[int] | None = None, method: str | None = None,
                    chunk: int = 16) -> tuple[np.ndarray, str]:
    """``[n, H, W, 3]`` uint8 -> (mean flow magnitude from frame ``i - 1`` to frame ``i`` for each ``i`` in
    ``ends`` (default: every frame from 1), in the video's pixels per frame; the method used)."""
    method = method or default_method()
    ends = list(range(1, len(frames))) if ends is None else [i for i in ends if 0 < i < len(frames)]
    values = []
    for start in range(0, len(ends), chunk):
        part = ends[start:start + chunk]
        gray, scale = luma(np.concatenate([frames[[i - 1 for i in part]], frames[part]]))
        flow = flow_field(gray[:len(part)], gray[len(part):], method)
        values.append(flow.norm(dim=1).flatten(1).mean(1) / scale)
    return (torch.cat(values).double().numpy() if values else np.zeros(0)), method

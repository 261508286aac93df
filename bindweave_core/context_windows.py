"""Context windows: a long video denoised as overlapping clips of the length the model was trained on.

At every step each window is, to the DiT, an ordinary clip: the window's latent frames at window-local
positions, the full reference conditioning (BindWeave's 4 slots, CLIP tokens, planner and UMT5 states;
Kaleido's reference latents at their R-RoPE positions) and the video condition of a clip of the window's
length (the same tensor for every window of that length). The windows' velocities are fused per frame
with weights, for the positive and negative branch alike, before guidance.

Placement and weights are ComfyUI's (``comfy/context_windows.py``, nodes ``ContextWindowsManual`` and
``WanContextWindowsManual`` in ComfyUI 0.33), so the native route with those nodes gives our Sampler's
numbers:

* ``standard_static``: windows of ``L`` latent frames every ``L - O`` frames; the last one is moved back to
  end at the last frame. ``batched``: consecutive windows without overlap, the last one shorter.
* every window not starting at frame 0 gets one *anchor* frame in front (the frame before it), which the
  DiT sees and whose output is dropped (ComfyUI's ``causal_window_fix``, always on in its Wan node): the
  causal VAE's first latent frame stands for one video frame, the others for four.
* ``pyramid`` weights ``min(i + 1, L - i)``; ``flat`` ones; ``overlap-linear`` ramps over the overlap on
  the sides that have a neighbour. The fused velocity is the weighted sum over windows divided by the
  sum of the weights.

Lengths are counted in video frames as ComfyUI's Wan node counts them: ``context_frames`` 4k+1 (``k + 1``
latent frames), ``context_overlap`` a multiple of 4 (``/ 4`` latent frames).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import constants as C
from .errors import InputError

log = logging.getLogger("BindWeave")

CONTEXT_SCHEDULES = C.CONTEXT_SCHEDULES
CONTEXT_FUSE_METHODS = C.CONTEXT_FUSE_METHODS
DEFAULT_CONTEXT_SCHEDULE = C.DEFAULT_CONTEXT_SCHEDULE
DEFAULT_CONTEXT_FUSE = C.DEFAULT_CONTEXT_FUSE
DEFAULT_CONTEXT_OVERLAP = C.DEFAULT_CONTEXT_OVERLAP
# ComfyUI's overlap-linear ramps start at this weight instead of 0 (a frame is never weighted 0 everywhere)
_RAMP_FLOOR = 1e-37


@dataclass(frozen=True)
class ContextWindow:
    """One window: the latent frames it fuses into, and the anchor frame in front of it (or None)."""

    frames: tuple[int, ...]
    anchor: int | None = None

    @property
    def dit_frames(self) -> list[int]:
        """The latent frames the DiT sees, in order: the anchor (if any), then the window's own."""
        return ([self.anchor] if self.anchor is not None else []) + list(self.frames)

    def describe(self) -> dict:
        """For the sidecar: the window's first and last video frame (inclusive) and its anchor."""
        first, last = self.frames[0], self.frames[-1]
        return {"latent_frames": [first, last],
                "video_frames": [0 if first == 0 else (first - 1) * C.VAE_TEMPORAL_FACTOR + 1,
                                 last * C.VAE_TEMPORAL_FACTOR],
                "anchor_latent_frame": self.anchor}


def check_context(context_frames: int, context_overlap: int) -> None:
    """What the one settings validator (``setting_bounds``) cannot see field by field: a window of 4k+1 frames
    (0: off) and an overlap shorter than it. Nothing is rounded."""
    if context_frames == 0:
        return
    if context_frames < 1 + C.VAE_TEMPORAL_FACTOR or (context_frames - 1) % C.VAE_TEMPORAL_FACTOR:
        k = max(1, round((context_frames - 1) / C.VAE_TEMPORAL_FACTOR))
        raise InputError(f"context frames must be 0 (off) or 4k+1 and at least 5 (e.g. {4 * k + 1} or "
                         f"{4 * k + 5}), got {context_frames}.")
    if context_overlap >= context_frames - 1:
        raise InputError(f"context overlap {context_overlap} must be shorter than the window "
                         f"({context_frames} frames): use at most {context_frames - 5}.")


def window_latent_frames(context_frames: int, context_overlap: int) -> tuple[int, int]:
    """``(L, O)``: the window and overlap in latent frames."""
    return C.latent_frames(context_frames), context_overlap // C.VAE_TEMPORAL_FACTOR


def plan_windows(latent_frames: int, context_frames: int, context_overlap: int = DEFAULT_CONTEXT_OVERLAP,
                 schedule: str = DEFAULT_CONTEXT_SCHEDULE) -> list[ContextWindow]:
    """The windows over ``latent_frames``; one window (no anchor) when the video fits in one, or when off."""
    if context_frames == 0:
        return [ContextWindow(tuple(range(latent_frames)))]
    length, overlap = window_latent_frames(context_frames, context_overlap)
    if latent_frames <= length:
        return [ContextWindow(tuple(range(latent_frames)))]
    if schedule == "batched":
        starts = list(range(0, latent_frames, length))
        spans = [(s, min(s + length, latent_frames)) for s in starts]
    else:
        spans, start = [], 0
        while start + length < latent_frames:
            spans.append((start, start + length))
            start += length - overlap
        spans.append((latent_frames - length, latent_frames))  # the last window ends at the last frame
    return [ContextWindow(tuple(range(a, b)), anchor=a - 1 if a > 0 else None) for a, b in spans]


def fuse_weights(window: ContextWindow, latent_frames: int, overlap: int, fuse: str) -> torch.Tensor:
    """The float32 weight of each of the window's frames."""
    n = len(window.frames)
    if fuse == "flat":
        return torch.ones(n)
    if fuse == "overlap-linear":
        weights = torch.ones(n)
        if window.frames[0] > 0:
            weights[:overlap] = torch.linspace(_RAMP_FLOOR, 1, overlap)
        if window.frames[-1] < latent_frames - 1:
            weights[n - overlap:] = torch.linspace(1, _RAMP_FLOOR, overlap)
        return weights
    return torch.tensor([float(min(i + 1, n - i)) for i in range(n)])


# A predictor as the sampler calls it: (latents, timestep, "cond" | "uncond" | "both") -> velocity.
Predict = Callable[[torch.Tensor, torch.Tensor, str], torch.Tensor]


def windowed_predictor(windows: list[ContextWindow], predictor_for: Callable[[int], Predict], latent_frames: int,
                       overlap: int, fuse: str,
                       on_window: Callable[[int, int], None] | None = None) -> Predict:
    """A predictor over the whole video that runs ``predictor_for(n)`` (a predictor for ``n`` DiT frames: the
    window's conditioning) on each window and fuses the velocities per frame.

    ``on_window(index, total)`` is called before each window (progress; raising cancels between windows)."""
    weights = [fuse_weights(w, latent_frames, overlap, fuse) for w in windows]

    def predict(latents: torch.Tensor, timestep: torch.Tensor, which: str) -> torch.Tensor:
        fused = counts = None
        for i, (window, weight) in enumerate(zip(windows, weights)):
            if on_window is not None:
                on_window(i, len(windows))
            sub = latents[:, :, window.dit_frames]
            out = predictor_for(len(window.dit_frames))(sub, timestep, which).float()
            if window.anchor is not None:
                out = out[:, :, 1:]
            if fused is None:
                fused = out.new_zeros(out.shape[0], *latents.shape[1:])
                counts = out.new_zeros(latents.shape[2])
            w = weight.to(out.device)
            fused[:, :, list(window.frames)] += out * w.view(1, 1, -1, 1, 1)
            counts[list(window.frames)] += w
            del out, sub
        return fused / counts.view(1, 1, -1, 1, 1)

    return predict


def window_condition(condition: torch.Tensor, latent_frames: int, slots: int = C.NUM_REF_SLOTS) -> torch.Tensor:
    """The VAE condition ``[B, 20, slots + T, h, w]`` of a ``latent_frames``-long clip: the same slots, then
    the first ``latent_frames`` frames of the video condition, which *is* the condition of a clip of that
    length (the VAE is causal: the zero video's first latent frames do not depend on its length; the
    ``test_vae`` zero-video test checks it bit for bit)."""
    available = condition.shape[2] - slots
    if latent_frames > available:
        raise InputError(f"a context window of {latent_frames} latent frames is longer than the video condition "
                         f"({available} latent frames): encode the references for the whole video's length.")
    return condition[:, :, :slots + latent_frames]


def longest_dit_window(windows: list[ContextWindow]) -> int:
    """Latent frames of the longest clip the DiT sees (the video condition's length, computed once)."""
    return max(len(w.dit_frames) for w in windows)

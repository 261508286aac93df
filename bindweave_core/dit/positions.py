"""Per-token (t, h, w) rotary positions for the DiT's token sequence.

The DiT never infers positions from a tensor shape: every layout is an explicit ``[S, 3]`` integer
grid in token order, so the BindWeave slot layout and the R-RoPE (Kaleido) layout are one call
each, and anything else a test or a new checkpoint needs is one ``torch.cat`` away.
"""

from __future__ import annotations

import torch

from .. import constants as C


def grid_positions(frames: int, height: int, width: int, *, t0: int = 0, h0: int = 0, w0: int = 0) -> torch.Tensor:
    """Positions of a ``frames x height x width`` token grid in raster order (t slowest, w fastest)."""
    t = torch.arange(t0, t0 + frames)
    h = torch.arange(h0, h0 + height)
    w = torch.arange(w0, w0 + width)
    tt, hh, ww = torch.meshgrid(t, h, w, indexing="ij")
    return torch.stack([tt, hh, ww], dim=-1).reshape(-1, 3)


def slot_layout_positions(total_frames: int, height: int, width: int) -> torch.Tensor:
    """BindWeave (spec section 9): plain Wan 3D grid over ``slots + T`` frames.

    The reference slots take temporal indices ``0..3`` and the video frames ``4..T+3``.
    """
    return grid_positions(total_frames, height, width)


def rrope_layout_positions(num_refs: int, height: int, width: int, video_frames: int,
                           shift: int = C.RROPE_POSITION_SHIFT) -> torch.Tensor:
    """R-RoPE (Kaleido): reference tokens first, then the video tokens.

    Reference ``i`` patch ``(y, x)`` sits at ``(t=i, h=shift+y, w=shift+x)``; the video tokens keep
    the unshifted grid ``(0..T-1, 0..h-1, 0..w-1)``.
    """
    refs = [grid_positions(1, height, width, t0=i, h0=shift, w0=shift) for i in range(num_refs)]
    return torch.cat(refs + [grid_positions(video_frames, height, width)], dim=0)

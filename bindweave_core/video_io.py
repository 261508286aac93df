"""Reading and writing videos with PyAV, and writing outputs safely (temp name, then rename)."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomic import atomic_path
from .constants import DEFAULT_FPS, MP4_CRF, MP4_ENCODER_THREADS
from .errors import InputError

_M_PERTURB = -6  # glibc's mallopt parameter number (malloc.h)
_PERTURB_BYTE = 0x5A
_PERTURB_LOCK = threading.Lock()


def frames_to_uint8(frames: torch.Tensor | np.ndarray) -> np.ndarray:
    """``[N, H, W, 3]`` float in 0..1 (or uint8) -> uint8 array."""
    if isinstance(frames, torch.Tensor):
        if frames.is_floating_point():
            frames = (frames.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
        frames = frames.cpu().numpy()
    return np.ascontiguousarray(frames, dtype=np.uint8)


@contextmanager
def _defined_heap_memory() -> Iterator[None]:
    """While encoding, make glibc fill newly allocated heap memory with a fixed byte (``M_PERTURB``).

    Why: libx264 as PyAV bundles it reads some heap memory it has not written (seen with MALLOC_PERTURB_:
    with it the same frames always give the same bytes; without it the output depended on what the process
    had done before, e.g. a second generate in one process differed by up to 26/255). Elsewhere than glibc
    this is a no-op; the encode is then deterministic only as far as the platform's allocator is."""
    mallopt = _glibc_mallopt()
    if mallopt is None:
        yield
        return
    with _PERTURB_LOCK:
        mallopt(_M_PERTURB, _PERTURB_BYTE)
        try:
            yield
        finally:
            mallopt(_M_PERTURB, 0)


def _glibc_mallopt():
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None


def write_mp4(frames: torch.Tensor | np.ndarray, path: str | os.PathLike, fps: float = DEFAULT_FPS,
              crf: int = MP4_CRF, threads: int = MP4_ENCODER_THREADS) -> Path:
    """Encode ``[N, H, W, 3]`` frames as H.264 MP4 (yuv420p) at ``fps``; atomic. The same frames give the same
    bytes: a fixed encoder thread count, and no creation time or other per-run metadata in the container."""
    import av

    data = frames_to_uint8(frames)
    if data.ndim != 4 or data.shape[-1] != 3:
        raise InputError(f"frames must be [N, H, W, 3], got {data.shape}")
    n, h, w, _ = data.shape
    path = Path(path)
    with atomic_path(path) as tmp, _defined_heap_memory():
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            stream.options = {"crf": str(crf), "threads": str(threads)}
            for i in range(n):
                for packet in stream.encode(av.VideoFrame.from_ndarray(data[i], format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    return path


def read_video(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """Decode every frame of a video file: ``(uint8 [N, H, W, 3], fps)``. Clear error if unreadable."""
    import av

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    except (av.error.FFmpegError, IndexError, OSError) as e:
        raise InputError(f"{path}: cannot read this video ({e}). Check the file, or re-encode it as MP4.") from e
    if not frames:
        raise InputError(f"{path}: the video has no frames")
    return np.stack(frames), fps


def write_json(data: dict[str, Any], path: str | os.PathLike) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    return Path(path)

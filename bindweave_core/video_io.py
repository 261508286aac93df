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


class Mp4Writer:
    """An H.264 MP4 (yuv420p) written frame chunk by frame chunk: ``write([n, H, W, 3])`` encodes at once, so
    nothing the size of the whole video is held. The stream is set up by the first chunk."""

    def __init__(self, path: str | os.PathLike, fps: float = DEFAULT_FPS, crf: int = MP4_CRF,
                 threads: int = MP4_ENCODER_THREADS) -> None:
        import av

        with _defined_heap_memory():
            self.container = av.open(str(path), mode="w", format="mp4")
        self.threads = threads
        self.fps, self.crf = fps, crf
        self.stream = None
        self.frames = 0

    def write(self, frames: torch.Tensor | np.ndarray) -> None:
        import av

        data = frames_to_uint8(frames)
        if data.ndim != 4 or data.shape[-1] != 3:
            raise InputError(f"frames must be [N, H, W, 3], got {data.shape}")
        with _defined_heap_memory():
            if self.stream is None:
                self.stream = self.container.add_stream("libx264", rate=Fraction(self.fps).limit_denominator(1000))
                self.stream.width, self.stream.height, self.stream.pix_fmt = data.shape[2], data.shape[1], "yuv420p"
                self.stream.options = {"crf": str(self.crf), "threads": str(self.threads)}
            for frame in data:
                for packet in self.stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    self.container.mux(packet)
        self.frames += data.shape[0]

    def close(self) -> None:
        with _defined_heap_memory():
            if self.stream is not None:
                for packet in self.stream.encode():
                    self.container.mux(packet)
            self.container.close()

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def write_mp4(frames: torch.Tensor | np.ndarray, path: str | os.PathLike, fps: float = DEFAULT_FPS,
              crf: int = MP4_CRF, threads: int = MP4_ENCODER_THREADS) -> Path:
    """Encode ``[N, H, W, 3]`` frames as H.264 MP4 (yuv420p) at ``fps``; atomic. The same frames give the same
    bytes: a fixed encoder thread count, heap memory defined while encoding, no per-run container metadata."""
    path = Path(path)
    with atomic_path(path) as tmp, Mp4Writer(tmp, fps, crf, threads) as writer:
        writer.write(frames)
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

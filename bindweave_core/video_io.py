"""Reading and writing videos with PyAV, and writing outputs safely (temp name, then rename)."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import InputError


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def frames_to_uint8(frames: torch.Tensor | np.ndarray) -> np.ndarray:
    """``[N, H, W, 3]`` float in 0..1 (or uint8) -> uint8 array."""
    if isinstance(frames, torch.Tensor):
        if frames.is_floating_point():
            frames = (frames.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
        frames = frames.cpu().numpy()
    return np.ascontiguousarray(frames, dtype=np.uint8)


class Mp4Writer:
    """An H.264 MP4 (yuv420p) written frame chunk by frame chunk: ``write([n, H, W, 3])`` encodes at once, so
    nothing the size of the whole video is held. The stream is set up by the first chunk."""

    def __init__(self, path: str | os.PathLike, fps: float = 16, crf: int = 18) -> None:
        import av

        self.container = av.open(str(path), mode="w", format="mp4")
        self.fps, self.crf = fps, crf
        self.stream = None
        self.frames = 0

    def write(self, frames: torch.Tensor | np.ndarray) -> None:
        import av

        data = frames_to_uint8(frames)
        if data.ndim != 4 or data.shape[-1] != 3:
            raise InputError(f"frames must be [N, H, W, 3], got {data.shape}")
        if self.stream is None:
            self.stream = self.container.add_stream("libx264", rate=Fraction(self.fps).limit_denominator(1000))
            self.stream.width, self.stream.height, self.stream.pix_fmt = data.shape[2], data.shape[1], "yuv420p"
            self.stream.options = {"crf": str(self.crf)}
        for frame in data:
            for packet in self.stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                self.container.mux(packet)
        self.frames += data.shape[0]

    def close(self) -> None:
        if self.stream is not None:
            for packet in self.stream.encode():
                self.container.mux(packet)
        self.container.close()

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def write_mp4(frames: torch.Tensor | np.ndarray, path: str | os.PathLike, fps: float = 16, crf: int = 18) -> Path:
    """Encode ``[N, H, W, 3]`` frames as H.264 MP4 (yuv420p) at ``fps``; atomic."""
    path = Path(path)
    with atomic_path(path) as tmp, Mp4Writer(tmp, fps, crf) as writer:
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

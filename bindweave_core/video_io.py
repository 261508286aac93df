"""Reading and writing videos with PyAV, and writing outputs safely (temp name, then rename)."""

from __future__ import annotations

import errno
import json
import os
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import InputError, OutputWriteError


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:  # disk full, quota, I/O error: one clear line (the temp file goes below)
        if isinstance(e, OutputWriteError):
            raise
        raise OutputWriteError(write_error_message(path, e)) from None
    finally:
        if tmp.exists():
            tmp.unlink()


def write_error_message(path: Path, error: OSError) -> str:
    reason = os.strerror(error.errno) if error.errno else str(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free some space there or choose another output folder"
    else:
        fix = "check the folder (permissions, the disk) or choose another output folder"
    return f"could not write {path}: {reason}; {fix}. No partial file was left behind."


def frames_to_uint8(frames: torch.Tensor | np.ndarray) -> np.ndarray:
    """``[N, H, W, 3]`` float in 0..1 (or uint8) -> uint8 array."""
    if isinstance(frames, torch.Tensor):
        if frames.is_floating_point():
            frames = (frames.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
        frames = frames.cpu().numpy()
    return np.ascontiguousarray(frames, dtype=np.uint8)


def write_mp4(frames: torch.Tensor | np.ndarray, path: str | os.PathLike, fps: float = 16, crf: int = 18) -> Path:
    """Encode ``[N, H, W, 3]`` frames as H.264 MP4 (yuv420p) at ``fps``; atomic."""
    import av

    data = frames_to_uint8(frames)
    if data.ndim != 4 or data.shape[-1] != 3:
        raise InputError(f"frames must be [N, H, W, 3], got {data.shape}")
    n, h, w, _ = data.shape
    path = Path(path)
    with atomic_path(path) as tmp:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            stream.options = {"crf": str(crf)}
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

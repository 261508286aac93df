"""What a byte-reproducible MP4 costs: our writer (libx264 with a fixed thread count, heap memory defined while
encoding: bindweave_core.video_io.write_mp4) against plain PyAV with libx264's defaults (threads follow the
core count, and the bytes can depend on the process's earlier work), on noise-like 720p frames.

    python benchmarks/mp4_encode.py [--frames 81] [--width 1280] [--height 720] [--repeats 2]

Prints seconds per encode for each setting, whether repeated encodes gave identical bytes, and the ratio
against the default in the same process.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import time
from fractions import Fraction

import numpy as np

from bindweave_core.constants import DEFAULT_FPS, MP4_CRF, MP4_ENCODER_THREADS


def frames(n: int, h: int, w: int) -> np.ndarray:
    """Moving blocks plus per-pixel noise: hard content for the encoder, like an early-step preview."""
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
    return np.stack([np.kron(np.roll(blocks, i, axis=1), np.ones((8, 8, 1), np.uint8))
                     ^ rng.integers(0, 32, (h, w, 3), dtype=np.uint8) for i in range(n)])


def encode(data: np.ndarray, threads: str | None) -> tuple[str, float]:
    import av

    buf, start = io.BytesIO(), time.perf_counter()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(DEFAULT_FPS))
        stream.width, stream.height, stream.pix_fmt = data.shape[2], data.shape[1], "yuv420p"
        stream.options = {"crf": str(MP4_CRF), **({"threads": threads} if threads else {})}
        for frame in data:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return hashlib.sha256(buf.getvalue()).hexdigest()[:12], time.perf_counter() - start


def ours(data: np.ndarray) -> tuple[str, float]:
    import tempfile
    from pathlib import Path

    from bindweave_core.video_io import write_mp4

    with tempfile.TemporaryDirectory() as d:
        start = time.perf_counter()
        path = write_mp4(data, Path(d) / "v.mp4")
        seconds = time.perf_counter() - start
        return hashlib.sha256(path.read_bytes()).hexdigest()[:12], seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=720)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    data = frames(args.frames, args.height, args.width)
    base = None
    settings = {"plain PyAV, default threads": lambda: encode(data, None),
                "plain PyAV, threads=1": lambda: encode(data, "1"),
                f"write_mp4 (threads={MP4_ENCODER_THREADS})": lambda: ours(data)}
    for label, run in settings.items():
        runs = [run() for _ in range(args.repeats)]
        seconds = min(t for _, t in runs)
        base = base or seconds
        same = len({h for h, _ in runs}) == 1
        print(f"{label:26s} {seconds:6.2f} s/encode  x{seconds / base:.2f} of default  "
              f"identical over {args.repeats} runs: {same}  ({args.frames} frames {args.width}x{args.height})")


if __name__ == "__main__":
    main()

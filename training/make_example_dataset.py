"""A tiny synthetic dataset for trying the trainer and for tests: moving shapes, references, prompts.

    python -m training.make_example_dataset data/example --samples 4 --size 64x48 --frames 17
    python -m training.make_example_dataset data/example_jsonl --layout jsonl --with-bad

Each sample is a short MP4 (written with PyAV) of a coloured disc or square moving over a gradient
background, one or two reference images of the shape (the second, when present, an RGBA cut-out
with a mask), and a prompt describing it. ``--with-bad`` adds samples the trainer must reject
(an unreadable video, a too-short video, a missing reference, a mask of the wrong size).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from bindweave_core.video_io import write_mp4

log = logging.getLogger("BindWeave")

COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230), "yellow": (235, 210, 40),
           "purple": (150, 60, 200), "orange": (245, 140, 30)}
SHAPES = ("disc", "square")


def _shape_mask(kind: str, size: int) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size] + 0.5
    if kind == "disc":
        return (xx - size / 2) ** 2 + (yy - size / 2) ** 2 <= (size / 2) ** 2
    return np.ones((size, size), dtype=bool)


def render_video(kind: str, colour: tuple[int, int, int], background: tuple[np.ndarray, np.ndarray],
                 width: int, height: int, frames: int, direction: int) -> np.ndarray:
    """``[frames, height, width, 3]`` uint8: the shape crossing a vertical gradient."""
    top, bottom = background
    ramp = np.linspace(0, 1, height)[:, None, None]
    bg = (top[None, None] * (1 - ramp) + bottom[None, None] * ramp).repeat(width, axis=1)
    size = max(4, min(width, height) // 3)
    mask = _shape_mask(kind, size)
    out = np.empty((frames, height, width, 3), dtype=np.uint8)
    for i in range(frames):
        t = i / max(1, frames - 1)
        x = int(round((t if direction > 0 else 1 - t) * (width - size)))
        y = (height - size) // 2 + int(round(np.sin(2 * np.pi * t) * height / 8))
        frame = bg.copy()
        region = frame[y:y + size, x:x + size]
        region[mask[: region.shape[0], : region.shape[1]]] = colour
        out[i] = frame.clip(0, 255).astype(np.uint8)
    return out


def reference_images(kind: str, colour: tuple[int, int, int], size: int) -> tuple[Image.Image, Image.Image, Image.Image]:
    """The shape on white (RGB), the same as an RGBA cut-out, and its mask (L)."""
    mask = _shape_mask(kind, size)
    rgb = np.full((size, size, 3), 255, dtype=np.uint8)
    rgb[mask] = colour
    rgba = np.zeros((size, size, 4), dtype=np.uint8)
    rgba[mask] = (*colour, 255)
    return Image.fromarray(rgb), Image.fromarray(rgba), Image.fromarray((mask * 255).astype(np.uint8))


def make_example_dataset(root: str | Path, *, samples: int = 4, width: int = 64, height: int = 48, frames: int = 17,
                         fps: float = 16, seed: int = 0, layout: str = "folders", with_bad: bool = False) -> Path:
    """Write the dataset under ``root``; returns the path to give as ``data.path``."""
    if layout not in ("folders", "jsonl"):
        raise ValueError(f"layout must be folders or jsonl, got {layout!r}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    lines = []
    for i in range(samples):
        colour_name = rng.choice(sorted(COLOURS))
        kind = SHAPES[i % len(SHAPES)]
        direction = 1 if rng.random() < 0.5 else -1
        background = (np.array([rng.randint(0, 255) for _ in range(3)], dtype=np.float64),
                      np.array([rng.randint(0, 255) for _ in range(3)], dtype=np.float64))
        prompt = (f"a {colour_name} {kind} moving {'right' if direction > 0 else 'left'} across a gradient "
                  f"background")
        video = render_video(kind, COLOURS[colour_name], background, width, height, frames, direction)
        ref, cutout, mask = reference_images(kind, COLOURS[colour_name], max(8, min(width, height) // 2))
        folder = root / f"sample_{i:03d}"
        folder.mkdir(exist_ok=True)
        write_mp4(video, folder / "video.mp4", fps=fps)
        ref.save(folder / "ref1.png")
        refs: list = [f"{folder.name}/ref1.png"]
        if i % 2:  # every other sample also has a masked cut-out as a second reference
            cutout.save(folder / "ref2.png")
            mask.save(folder / "ref2_mask.png")
            refs.append({"image": f"{folder.name}/ref2.png", "mask": f"{folder.name}/ref2_mask.png"})
        (folder / "prompt.txt").write_text(prompt + "\n")
        lines.append({"video": f"{folder.name}/video.mp4", "prompt": prompt, "references": refs})
    if with_bad:
        lines += _bad_samples(root, width, height, frames, fps)
    if layout == "jsonl":
        path = root / "samples.jsonl"
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))
        return path
    return root


def _bad_samples(root: Path, width: int, height: int, frames: int, fps: float) -> list[dict]:
    """Samples the trainer must report: unreadable video, too short, missing reference, bad mask."""
    colour, bg = COLOURS["red"], (np.zeros(3), np.full(3, 255.0))
    ref, _, mask = reference_images("disc", colour, 16)
    lines = []

    def folder(name: str) -> Path:
        f = root / name
        f.mkdir(exist_ok=True)
        (f / "prompt.txt").write_text("a red disc\n")
        return f

    f = folder("bad_unreadable_video")
    (f / "video.mp4").write_bytes(b"this is not a video")
    ref.save(f / "ref1.png")
    lines.append({"video": f"{f.name}/video.mp4", "prompt": "a red disc", "references": [f"{f.name}/ref1.png"]})

    f = folder("bad_too_short")
    write_mp4(render_video("disc", colour, bg, width, height, 2, 1), f / "video.mp4", fps=fps)
    ref.save(f / "ref1.png")
    lines.append({"video": f"{f.name}/video.mp4", "prompt": "a red disc", "references": [f"{f.name}/ref1.png"]})

    f = folder("bad_missing_reference")
    write_mp4(render_video("disc", colour, bg, width, height, frames, 1), f / "video.mp4", fps=fps)
    lines.append({"video": f"{f.name}/video.mp4", "prompt": "a red disc", "references": [f"{f.name}/ref1.png"]})

    f = folder("bad_mask_size")
    write_mp4(render_video("disc", colour, bg, width, height, frames, 1), f / "video.mp4", fps=fps)
    ref.save(f / "ref1.png")
    mask.resize((8, 8)).save(f / "ref1_mask.png")
    lines.append({"video": f"{f.name}/video.mp4", "prompt": "a red disc",
                  "references": [{"image": f"{f.name}/ref1.png", "mask": f"{f.name}/ref1_mask.png"}]})
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.make_example_dataset", description=__doc__.split("\n\n")[0])
    p.add_argument("root", help="folder to write")
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--size", default="64x48", help="WIDTHxHEIGHT of the videos")
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--fps", type=float, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layout", choices=("folders", "jsonl"), default="folders")
    p.add_argument("--with-bad", action="store_true", help="add samples the trainer must reject")
    args = p.parse_args(argv)
    width, _, height = args.size.partition("x")
    path = make_example_dataset(args.root, samples=args.samples, width=int(width), height=int(height),
                                frames=args.frames, fps=args.fps, seed=args.seed, layout=args.layout,
                                with_bad=args.with_bad)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log.info("example dataset written: data.path = %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

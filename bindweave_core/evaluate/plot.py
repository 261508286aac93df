"""The evaluation plot, drawn with PIL (no plotting package): per-frame curves with window boundaries.

Top panel: every similarity curve (CLIP-I per reference, the best region, DINO-I, faces) plus subject
consistency and temporal flickering, on one score axis. Bottom panel: motion amplitude in pixels per frame.
Context windows are shaded and their boundaries drawn as dashed lines, so identity drift can be placed in time.
"""

from __future__ import annotations

import math
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from .report import curves

WIDTH, HEIGHT = 1100, 640
LEFT, RIGHT, TOP, GAP, BOTTOM = 70, 250, 50, 50, 40
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
WINDOW_SHADE = (236, 240, 248)
BOUNDARY = (120, 120, 120)
LABELS = {"clip_i": "CLIP-I", "clip_i_region": "CLIP-I region", "dino_i": "DINO-I", "face_similarity": "face",
          "subject_consistency": "subject consistency", "temporal_flickering": "temporal flickering",
          "motion_amplitude": "motion (px/frame)"}


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType
    except TypeError:
        return ImageFont.load_default()


def _label(name: str, report: dict[str, Any]) -> str:
    key, _, ref = name.partition("[")
    text = LABELS.get(key, key)
    if ref:
        index = int(ref.rstrip("]"))
        text += f" #{index + 1}: " + report["references"][index]["name"].replace("\\", "/").rsplit("/", 1)[-1]
    return text if len(text) <= 30 else text[:29] + "..."


class _Panel:
    """One plot panel: maps (frame, value) to pixels and draws axes, windows and curves."""

    def __init__(self, draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], frames: int,
                 lo: float, hi: float) -> None:
        self.draw, self.box, self.frames, self.lo, self.hi = draw, box, frames, lo, hi

    def xy(self, frame: float, value: float) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        x = x0 + (x1 - x0) * frame / max(self.frames - 1, 1)
        return x, y1 - (y1 - y0) * (value - self.lo) / max(self.hi - self.lo, 1e-9)

    def axes(self, title: str, font: ImageFont.ImageFont, decimals: int) -> None:
        x0, y0, x1, y1 = self.box
        for k in range(5):
            value = self.lo + (self.hi - self.lo) * k / 4
            _, y = self.xy(0, value)
            self.draw.line([(x0, y), (x1, y)], fill=(225, 225, 225))
            self.draw.text((x0 - 6, y), f"{value:.{decimals}f}", fill="black", font=font, anchor="rm")
        step = max(1, math.ceil(self.frames / 10))
        for f in range(0, self.frames, step):
            x, _ = self.xy(f, self.lo)
            self.draw.line([(x, y1), (x, y1 + 4)], fill="black")
            self.draw.text((x, y1 + 6), str(f), fill="black", font=font, anchor="mt")
        self.draw.rectangle(self.box, outline="black")
        self.draw.text((x0, y0 - 6), title, fill="black", font=font, anchor="lb")

    def windows(self, windows: list[dict[str, Any]], font: ImageFont.ImageFont | None = None) -> None:
        """Every other window shaded, every boundary dashed; with ``font``, one labelled bar per window along
        the top (staggered, so overlapping windows stay apart)."""
        x0, y0, x1, y1 = self.box
        for k, w in enumerate(windows):
            a, _ = self.xy(w["start"], self.lo)
            b, _ = self.xy(w["end"] - 1, self.lo)
            if k % 2 == 0:
                self.draw.rectangle([a, y0 + 1, b, y1 - 1], fill=WINDOW_SHADE)
            if font is not None:
                y = y0 + 16 + 14 * (k % 3)
                self.draw.line([(a + 2, y), (b - 2, y)], fill=BOUNDARY, width=2)
                self.draw.text((a + 4, y - 1), f"w{k + 1} [{w['start']}, {w['end']})", fill=BOUNDARY, font=font,
                               anchor="lb")
        for w in windows:
            for edge in (w["start"], w["end"] - 1):
                x, _ = self.xy(edge, self.lo)
                for y in range(y0, y1, 8):
                    self.draw.line([(x, y), (x, min(y + 4, y1))], fill=BOUNDARY)

    def curve(self, frames: list[int], values: list, color: tuple[int, int, int]) -> None:
        points = [self.xy(f, v) for f, v in zip(frames, values) if v is not None]
        if len(points) > 1:
            self.draw.line(points, fill=color, width=2)
        for x, y in points if len(points) <= 40 else []:
            self.draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)


def _score_range(series: dict[str, dict[str, list]]) -> tuple[float, float]:
    """``(lo, hi)`` with hi >= 1 and ticks every multiple of 0.05 (the axis has 4 steps)."""
    values = [v for c in series.values() for v in c["values"] if v is not None]
    hi = max(1.0, max(values, default=1.0))
    step = max(0.05, math.ceil((hi - min(values, default=hi)) / 4 / 0.05 - 1e-9) * 0.05)
    return hi - 4 * step, hi


def draw_plot(report: dict[str, Any]) -> Image.Image:
    """The report's per-frame curves as an RGB image (``WIDTH`` x ``HEIGHT``)."""
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    font, small = _font(13), _font(11)
    frames = report["video"]["frames"]
    series = curves(report["metrics"])
    motion = series.pop("motion_amplitude", {"frames": [], "values": []})
    panel_h = (HEIGHT - TOP - GAP - BOTTOM) * 2 // 3
    top = _Panel(draw, (LEFT, TOP, WIDTH - RIGHT, TOP + panel_h), frames, *_score_range(series))
    bottom_y0 = TOP + panel_h + GAP
    peak = max([v for v in motion["values"] if v is not None], default=0.0)
    bottom = _Panel(draw, (LEFT, bottom_y0, WIDTH - RIGHT, HEIGHT - BOTTOM), frames, 0.0, max(peak * 1.1, 1e-3))
    top.windows(report.get("windows", []), small)
    bottom.windows(report.get("windows", []))
    top.axes("scores per frame (cosine; consistency and flickering 0..1)", font, 2)
    bottom.axes("motion amplitude (pixels per frame)", font, 1)
    draw.text((LEFT, 8), "BindWeave Evaluate - not OpenS2V-Eval scores (see JSON 'not_opens2v')", fill="black",
              font=font)
    legend_y = TOP
    for k, (name, c) in enumerate([*series.items(), ("motion_amplitude", motion)]):
        color = PALETTE[k % len(PALETTE)]
        (bottom if name == "motion_amplitude" else top).curve(c["frames"], c["values"], color)
        draw.line([(WIDTH - RIGHT + 12, legend_y + 7), (WIDTH - RIGHT + 32, legend_y + 7)], fill=color, width=3)
        draw.text((WIDTH - RIGHT + 38, legend_y), _label(name, report), fill="black", font=small)
        legend_y += 18
    if report.get("windows"):
        draw.text((WIDTH - RIGHT + 12, legend_y + 6), "shaded / dashed: context windows", fill=BOUNDARY, font=small)
    draw.text((LEFT, HEIGHT - 16), "frame", fill="black", font=small)
    return image

"""Context windows: which pixel frames each window of a windowed generation covers, and per-window means.

A window is a ``[start, end)`` range of pixel frames. They come from the ``"windows"`` field of a video's
JSON sidecar (a list of ``[start, end]`` pairs or of ``{"start": s, "end": e}`` objects), or from the user
(``"0:33, 24:57"``). Without windows there are no window means.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import InputError


def _pair(item: Any) -> tuple[int, int]:
    if isinstance(item, dict):
        item = (item.get("start"), item.get("end"))
    if not isinstance(item, (list, tuple)) or len(item) != 2 or not all(isinstance(v, int) for v in item):
        raise InputError(f"a context window must be [start, end) frame indices, got {item!r}")
    return int(item[0]), int(item[1])


def parse_windows(value: Any, num_frames: int) -> list[tuple[int, int]]:
    """Windows from a list of pairs/objects or a ``"s:e, s:e"`` string, checked against the video's length."""
    if value is None or value == "" or value == []:
        return []
    if isinstance(value, str):
        try:
            value = [[int(v) for v in part.split(":")] for part in value.replace(";", ",").split(",") if part.strip()]
        except ValueError:
            raise InputError(f"windows {value!r}: write them as start:end pairs, e.g. '0:33, 24:57'") from None
    if not isinstance(value, (list, tuple)):
        raise InputError(f"windows must be a list of [start, end) pairs, got {type(value).__name__}")
    windows = [_pair(item) for item in value]
    for start, end in windows:
        if not 0 <= start < end <= num_frames:
            raise InputError(f"window [{start}, {end}) is not inside the video's {num_frames} frames "
                             "(windows are [start, end) pixel-frame ranges)")
    return windows


def sidecar_windows(video: str | Path) -> tuple[Any, Path | None]:
    """The ``"windows"`` field of the JSON sidecar beside ``video`` (``X.mp4`` -> ``X.json``), if any."""
    sidecar = Path(video).with_suffix(".json")
    if not sidecar.is_file():
        return None, None
    try:
        data = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return None, None  # not our sidecar (or not JSON): nothing to read windows from
    return (data.get("windows") if isinstance(data, dict) else None), sidecar


def window_means(windows: list[tuple[int, int]], curves: dict[str, dict[str, list]]) -> list[dict[str, Any]]:
    """Per window: the mean of each curve's values at frames inside ``[start, end)`` (None if it has none).

    ``curves`` maps a name to ``{"frames": [...], "values": [...]}`` (values may be None: skipped)."""
    out = []
    for start, end in windows:
        means = {}
        for name, curve in curves.items():
            inside = [v for f, v in zip(curve["frames"], curve["values"]) if start <= f < end and v is not None]
            means[name] = sum(inside) / len(inside) if inside else None
        out.append({"start": start, "end": end, "means": means})
    return out

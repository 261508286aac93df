"""Scoring a video against its reference images (``python -m bindweave_core evaluate``, the BindWeave
Evaluate node, ``generate --evaluate``).

Modules: ``report`` (:func:`evaluate_video`, the JSON report), ``features`` (CLIP / DINOv2 features),
``temporal`` (VBench's subject consistency and temporal flickering), ``flow`` (motion amplitude),
``faces`` (optional ArcFace), ``windows`` (context windows), ``plot`` (the PIL plot), ``cli``.
Nothing here imports torch until it is used, so the command line's ``--help`` stays fast.
"""

from __future__ import annotations

from typing import Any

__all__ = ["EvaluationOptions", "draw_plot", "evaluate_video", "summary_text"]


def __getattr__(name: str) -> Any:
    if name in ("EvaluationOptions", "evaluate_video", "summary_text"):
        from . import report

        return getattr(report, name)
    if name == "draw_plot":
        from .plot import draw_plot

        return draw_plot
    raise AttributeError(name)

"""Scoring a video just generated (``generate --evaluate``, and the batch command): the sidecar's
``"evaluation"`` field, with the pipeline's own CLIP vision tower."""

from __future__ import annotations

import logging
from typing import Any

from ..errors import InputError
from .report import EvaluationOptions, evaluate_video
from .windows import parse_windows

log = logging.getLogger("BindWeave")


def check_can_evaluate(family_encoders: tuple[str, ...] | list[str], clip_vision: str | None, smoke: bool) -> None:
    """Before any model loads: a real run needs a CLIP vision file to score with (Kaleido uses none itself)."""
    if not smoke and "clip_vision" not in family_encoders and not clip_vision:
        raise InputError("--evaluate scores with CLIP ViT-H: give --clip-vision clip_vision_h.safetensors "
                         "(this model family does not load one itself).")


def evaluate_generated(pipe: Any, references: list, frames: Any, *, prompt: str | None = None,
                       fps: float | None = None, windows: Any = None,
                       options: EvaluationOptions | None = None, smoke: bool = False) -> dict[str, Any]:
    """The evaluation report of ``frames`` (``[N, H, W, 3]``, float 0..1 or uint8) made from ``references``
    (paths or images) by ``pipe``; its CLIP vision tower scores it (``smoke``: the tiny CLIP when the
    pipeline has none, e.g. the Kaleido smoke model). ``windows``: the run's context windows, if any."""
    options = options or EvaluationOptions()
    options.prompt = prompt if options.prompt is None else options.prompt
    options.windows = windows if options.windows is None else options.windows
    names = [str(r) if isinstance(r, (str, bytes)) or hasattr(r, "__fspath__") else f"reference {i + 1}"
             for i, r in enumerate(references)]
    unread = None
    try:  # the video exists now: a window record it cannot read must not throw the generation away
        parse_windows(options.windows, int(frames.shape[0]))
    except InputError as e:
        unread = f"window means not computed: the run's windows could not be read ({e})"
        log.warning("%s", unread)
        options.windows = None
    if pipe.current("clip_vision") is None:
        from ..encoders.clip_vision import ClipVisionEncoder

        if not smoke:
            raise InputError("this pipeline has no CLIP vision model to evaluate with; give --clip-vision.")
        report = evaluate_video(frames, references, ClipVisionEncoder.tiny(0), options, fps=fps, reference_names=names)
    else:
        with pipe.on_device("clip_vision") as clip:
            report = evaluate_video(frames, references, clip, options, fps=fps, reference_names=names)
    report["skipped"] += [unread] if unread else []
    report["frames_scored"] = "the decoded frames before H.264 encoding"
    return report

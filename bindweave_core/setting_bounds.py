"""Every generation setting's type and bounds, defined once, and the one function that checks a value.

``GenerationSettings`` (the Python API, the CLI, the nodes and the trainer's preview build one) checks
each field through :func:`check_setting` when it is made; the ComfyUI widgets read their min/max from
:data:`SETTINGS` (``nodes/specs.py``; a test compares them); the Sigmas node and the native MODEL check
their shift and steps here too. A value a user would reasonably pass is accepted as the plain Python
value it stands for (``numpy.float32(5.0)`` guidance -> ``5.0``, ``5`` -> ``5.0``, ``numpy.int64(81)``
frames -> ``81``, ``81.0`` -> ``81``); anything else is refused with the valid range: a string where a
number goes (``"81"``: pass the number), a non-integer step count, NaN, a list prompt, an unknown name.

Nothing here imports torch: ``generate --help`` stays fast.
"""

from __future__ import annotations

import math
import numbers
import unicodedata
from dataclasses import dataclass
from typing import Any

from . import constants as C
from .errors import InputError

ROPE_POSITIONS = C.ROPE_POSITIONS  # inputs stay inside the official rotary tables
MAX_SIDE = ROPE_POSITIONS * C.SIZE_MULTIPLE  # 16384 px: one position per 16 pixels
MAX_FRAMES = (ROPE_POSITIONS - C.NUM_REF_SLOTS - 1) * C.VAE_TEMPORAL_FACTOR + 1  # latent frames + 4 slots
MAX_STEPS = C.NUM_TRAIN_TIMESTEPS  # the schedulers pick steps among 1000 training timesteps
MAX_SEED = 2 ** 64 - 1  # torch.Generator.manual_seed takes unsigned 64-bit seeds


@dataclass(frozen=True)
class Setting:
    """One setting: ``kind`` int, float, str or bool; numbers in ``[min, max]``; ``multiple``/``offset``:
    the value is ``offset`` plus a multiple of ``multiple`` (frames 4k+1, sizes multiples of 16)."""

    label: str  # the name in messages (the CLI flag without dashes)
    kind: type
    default: Any = None
    min: float | None = None
    max: float | None = None
    choices: tuple[str, ...] = ()
    multiple: int = 1
    offset: int = 0
    optional: bool = False  # None is a valid value (e.g. refine_seed: greedy decoding)
    hint: str = ""  # appended to a range message: what the value means, the official one


SETTINGS: dict[str, Setting] = {
    "prompt": Setting("prompt", str),
    "negative_prompt": Setting("negative prompt", str, C.DEFAULT_NEGATIVE_PROMPT),
    "planner_negative_prompt": Setting("planner negative prompt", str, C.DEFAULT_PLANNER_NEGATIVE_PROMPT),
    "width": Setting("width", int, C.DEFAULT_WIDTH, C.SIZE_MULTIPLE, MAX_SIDE, multiple=C.SIZE_MULTIPLE,
                     hint=f"{MAX_SIDE} is the largest the DiT's position tables cover; the official size is "
                          f"{C.DEFAULT_WIDTH}x{C.DEFAULT_HEIGHT}"),
    "height": Setting("height", int, C.DEFAULT_HEIGHT, C.SIZE_MULTIPLE, MAX_SIDE, multiple=C.SIZE_MULTIPLE,
                      hint=f"{MAX_SIDE} is the largest the DiT's position tables cover; the official size is "
                           f"{C.DEFAULT_WIDTH}x{C.DEFAULT_HEIGHT}"),
    "num_frames": Setting("frames", int, C.DEFAULT_FRAMES, 1, MAX_FRAMES, multiple=C.VAE_TEMPORAL_FACTOR, offset=1,
                          hint=f"{MAX_FRAMES} is the longest the DiT's position tables cover; the official length "
                               f"is {C.DEFAULT_FRAMES}"),
    "steps": Setting("steps", int, C.DEFAULT_STEPS, 1, MAX_STEPS,
                     hint=f"the schedulers pick steps among {MAX_STEPS} training timesteps"),
    "guidance": Setting("guidance", float, C.DEFAULT_GUIDANCE, 0.0, 100.0,
                        hint=f"1.0 turns guidance off; the official value is {C.DEFAULT_GUIDANCE}"),
    "shift": Setting("shift", float, C.DEFAULT_SHIFT, 0.1, 100.0,
                     hint=f"the official value is {C.DEFAULT_SHIFT}, Kaleido's {C.KALEIDO_SHIFT}"),
    "sampler": Setting("sampler", str, C.DEFAULT_SAMPLER, choices=C.SAMPLERS),
    "seed": Setting("seed", int, C.DEFAULT_SEED, 0, MAX_SEED, hint="2**64 - 1 is the largest"),
    "fps": Setting("fps", int, C.DEFAULT_FPS, 1, 120, hint=f"the official rate is {C.DEFAULT_FPS}"),
    "refine_prompt": Setting("refine_prompt", bool, False),
    "refine_seed": Setting("refine seed", int, None, 0, MAX_SEED, optional=True, hint="none: greedy decoding"),
    "mask_mode": Setting("mask_mode", str, "rectangle", choices=C.MASK_MODES),
    "clip_resize_antialias": Setting("clip_resize_antialias", bool, C.CLIP_RESIZE_ANTIALIAS),
    "cfg_batch": Setting("cfg_batch", str, "auto", choices=C.CFG_BATCH_MODES),
    "step_cache": Setting("step_cache", float, 0.0, 0.0, 1.0,
                          hint=f"0 is off; {C.DEFAULT_STEP_CACHE} is the authors' value for Wan 2.1"),
    # context windows (bindweave_core.context_windows checks how they fit together: 4k+1 frames, overlap < frames)
    "context_frames": Setting("context frames", int, 0, 0, C.MAX_CONTEXT_FRAMES,
                              hint="0 is off; else 4k+1 video frames, e.g. 81, the length the models were trained on"),
    "context_overlap": Setting("context overlap", int, C.DEFAULT_CONTEXT_OVERLAP, 0, C.MAX_CONTEXT_FRAMES,
                               multiple=C.VAE_TEMPORAL_FACTOR, hint="video frames shared by neighbouring windows"),
    "context_schedule": Setting("context schedule", str, C.DEFAULT_CONTEXT_SCHEDULE, choices=C.CONTEXT_SCHEDULES),
    "context_fuse": Setting("context fuse method", str, C.DEFAULT_CONTEXT_FUSE, choices=C.CONTEXT_FUSE_METHODS),
}


def _number_text(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) and abs(value) < 1e6 else str(value)


def range_text(name: str) -> str:
    """The valid values of setting ``name`` in words (the CLI's help states them)."""
    return _range_text(SETTINGS[name])


def _range_text(s: Setting) -> str:
    """"a whole number from 1 to 1000", "4k+1 from 1 to 4077", "a number from 0 to 100"."""
    lo, hi = _number_text(s.min), _number_text(s.max)
    if s.multiple > 1:
        form = f"{s.multiple}k+{s.offset}" if s.offset else f"a multiple of {s.multiple}"
    else:
        form = "a whole number" if s.kind is int else "a number"
    return f"{form} from {lo} to {hi}"


def _refuse(s: Setting, value: Any, why: str) -> InputError:
    hint = f" ({s.hint})" if s.hint else ""
    return InputError(f"{s.label} must be {why}, got {value!r}{hint}.")


def _as_int(s: Setting, value: Any) -> int:
    if isinstance(value, (bool, str, bytes)) or not isinstance(value, numbers.Real):
        what = f"the number {value}, not the text {value!r}" if isinstance(value, str) else f"a {type(value).__name__}"
        raise InputError(f"{s.label} must be {_range_text(s)}; got {what}.")
    if isinstance(value, numbers.Integral):
        return int(value)
    as_float = float(value)
    if not math.isfinite(as_float) or not as_float.is_integer():
        raise _refuse(s, value, _range_text(s))
    return int(as_float)


def _as_float(s: Setting, value: Any) -> float:
    if isinstance(value, (bool, str, bytes)) or not isinstance(value, numbers.Real):
        what = f"the number {value}, not the text {value!r}" if isinstance(value, str) else f"a {type(value).__name__}"
        raise InputError(f"{s.label} must be {_range_text(s)}; got {what}.")
    as_float = float(value)
    if not math.isfinite(as_float):
        raise _refuse(s, value, f"finite, {_range_text(s)}")
    return as_float


def _checked_text(s: Setting, value: Any) -> str:
    if not isinstance(value, str):
        raise InputError(f"{s.label} must be text (a str), got a {type(value).__name__}: {value!r:.80}.")
    if s.choices and value not in s.choices:
        raise InputError(f"unknown {s.label} {value!r}; choose one of {', '.join(s.choices)}.")
    if len(value) > C.MAX_PROMPT_CHARACTERS:  # checked before anything reads it: a 1 MiB prompt is refused at once
        raise InputError(f"the {s.label} is {len(value):,} characters long; the limit is {C.MAX_PROMPT_CHARACTERS:,} "
                         f"characters (UMT5 reads only its first {C.TEXT_LEN} tokens, about 2000 characters). "
                         "Shorten it.")
    return value


def check_setting(name: str, value: Any) -> Any:
    """``value`` as the plain Python value of setting ``name`` (see the module docstring), or
    :class:`InputError` naming the valid range."""
    s = SETTINGS[name]
    if value is None and s.optional:
        return None
    if s.kind is str:
        return _checked_text(s, value)
    if s.kind is bool:
        numpy_bool = type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")
        if not isinstance(value, bool) and not numpy_bool:  # numpy's bool is no subclass of bool
            raise InputError(f"{s.label} must be true or false, got {value!r}.")
        return bool(value)
    number = _as_int(s, value) if s.kind is int else _as_float(s, value)
    if not s.min <= number <= s.max:
        raise _refuse(s, value, _range_text(s))
    if s.multiple > 1 and (number - s.offset) % s.multiple:
        lower = max(s.min, (number - s.offset) // s.multiple * s.multiple + s.offset)
        raise _refuse(s, value, f"{_range_text(s)}, e.g. {lower} or {lower + s.multiple}")
    return number


def check_prompt(prompt: Any) -> str:
    """The prompt as given, once it is text with something visible in it (not only spaces, zero-width or
    control characters, which the encoders would read as an empty prompt)."""
    text = check_setting("prompt", prompt)
    if not any(not unicodedata.category(ch).startswith(("Z", "C")) for ch in text):
        raise InputError("the prompt is empty (or only invisible characters): describe the video to generate.")
    return text


def check_reference_count(count: int, max_references: int = C.MAX_REFERENCES, model: str = "this model",
                          hint: str = "") -> None:
    """The one reference-count check (every path calls it with its model's limit): 1 to ``max_references``
    images, none dropped automatically. ``hint``: how to fix it where the user is (e.g. which node input)."""
    if not 1 <= count <= max_references:
        extra = f" Remove {count - max_references} of them (none are dropped automatically)." \
            if count > max_references else ""
        raise InputError(f"{count} reference images given; {model} takes 1 to {max_references}.{extra}"
                         + (f" {hint}" if hint else ""))


def widget_bounds(name: str) -> dict[str, Any]:
    """``{"default", "min", "max", "step"}`` of a ComfyUI widget for setting ``name``."""
    s = SETTINGS[name]
    out: dict[str, Any] = {"default": s.default, "min": s.kind(s.min), "max": s.kind(s.max)}
    if s.multiple > 1:
        out["step"] = s.multiple
    return out

"""Case files of ``generate --batch``: the OpenS2V-Eval ``test_case.json`` format, or JSON Lines.

* OpenS2V-Eval (the official ``test_case.json``): one JSON object, case id -> ``{"img_paths": [...],
  "prompt": ..., "class_label": [...], "synthesis_flag": ...}``. The labels say what the references show
  (for the benchmark's scoring), not how to generate, and are not used.
* JSON Lines (``.jsonl``): one object per line, ``{"id", "prompt", "refs": [...], "masks": [...]
  (optional), "seed" (optional), ...}`` plus any per-case setting of :data:`CASE_SETTINGS`. A ``.json``
  file holding a list of such objects is read the same way.

Relative image paths are resolved against the images root (``--images-root``, default the case file's
folder). Reading never fails on one bad case: each problem is kept with its case id, so the preflight
can report every bad case at once.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError

log = logging.getLogger("BindWeave")

# Per-case settings a case may set (case file key -> GenerationSettings field, expected type).
CASE_SETTINGS: dict[str, tuple[str, type | tuple[type, ...]]] = {
    "negative_prompt": ("negative_prompt", str), "width": ("width", int), "height": ("height", int),
    "frames": ("num_frames", int), "steps": ("steps", int), "guidance": ("guidance", (int, float)),
    "shift": ("shift", (int, float)), "sampler": ("sampler", str), "fps": ("fps", int),
    "mask_mode": ("mask_mode", str), "step_cache": ("step_cache", (int, float)),
}
CASE_KEYS = ("id", "prompt", "refs", "masks", "seed")
OPENS2V_KEYS = {"img_paths": "refs", "prompt": "prompt", "masks": "masks", "seed": "seed"}
OPENS2V_LABELS = ("class_label", "synthesis_flag")  # the benchmark's annotations, not generation inputs
# A case id names its output files: letters, digits, ".", "_", "-"; no leading dot (hidden files), no
# path separators, at most 128 characters.
ID_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


@dataclass
class Case:
    """One case as read (not yet checked): ``problems`` lists what is already known to be wrong."""

    id: str
    prompt: Any = None
    refs: list[Path] = field(default_factory=list)
    masks: list[Path] | None = None
    seed: Any = None
    settings: dict[str, Any] = field(default_factory=dict)  # GenerationSettings field -> value
    problems: list[str] = field(default_factory=list)


def read_cases(path: str | Path, images_root: str | Path | None = None) -> list[Case]:
    """Every case of the file, in file order; a file that is not a case file raises :class:`InputError`."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"--batch {path} not found (or not a file). Give an OpenS2V-Eval test_case.json or a "
                         ".jsonl case file.")
    root = Path(images_root).expanduser() if images_root else path.parent
    if images_root and not root.is_dir():
        raise InputError(f"--images-root {root} is not a folder.")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"--batch {path}: cannot read it as UTF-8 text ({e}).") from None
    if path.suffix.lower() == ".jsonl":
        cases = _read_json_lines(text)
    else:
        try:
            data = json.loads(text, object_pairs_hook=_no_duplicate_keys)
        except json.JSONDecodeError as e:
            raise InputError(f"--batch {path}: not valid JSON ({e}). A JSON Lines file must end in .jsonl.") from None
        if isinstance(data, dict):
            cases = [_opens2v_case(str(key), entry) for key, entry in data.items()]
        elif isinstance(data, list):
            cases = [_jsonl_case(entry, f"item {i + 1}") for i, entry in enumerate(data)]
        else:
            raise InputError(f"--batch {path}: expected an object of cases (OpenS2V-Eval) or a list of cases.")
    if not cases:
        raise InputError(f"--batch {path} holds no cases.")
    for case in cases:
        case.refs = [_resolve(p, root) for p in case.refs]
        case.masks = [_resolve(p, root) for p in case.masks] if case.masks is not None else None
    _check_ids(cases)
    return cases


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """JSON objects keep the last of two equal keys; two cases with one id would silently become one."""
    keys = [k for k, _ in pairs]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise InputError(f"--batch: key(s) {', '.join(repeated)} appear twice in one object (two cases with one id?). "
                         "Give each case its own id.")
    return dict(pairs)


def _resolve(p: Any, root: Path) -> Path:
    p = Path(str(p)).expanduser()
    return p if p.is_absolute() else root / p


def _read_json_lines(text: str) -> list[Case]:
    cases = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            cases.append(Case(id=f"line {number}", problems=[f"not valid JSON ({e.msg})"]))
            continue
        cases.append(_jsonl_case(entry, f"line {number}"))
    return cases


def _jsonl_case(entry: Any, where: str) -> Case:
    if not isinstance(entry, dict):
        return Case(id=where, problems=["a case must be a JSON object with id, prompt and refs"])
    raw_id = entry.get("id")
    case = Case(id=str(raw_id) if raw_id is not None else where)
    if raw_id is None:
        case.problems.append(f"no \"id\" ({where}): every case needs an id (its output file name)")
    unknown = sorted(set(entry) - set(CASE_KEYS) - set(CASE_SETTINGS))
    if unknown:
        case.problems.append(f"unknown key(s) {', '.join(unknown)}; a case takes {', '.join(CASE_KEYS)} and the "
                             f"settings {', '.join(CASE_SETTINGS)}")
    _fill(case, entry.get("prompt"), entry.get("refs"), entry.get("masks"), entry.get("seed"), entry, "refs")
    return case


def _opens2v_case(key: str, entry: Any) -> Case:
    case = Case(id=key)
    if not isinstance(entry, dict):
        case.problems.append("an OpenS2V-Eval case must be an object with img_paths and prompt")
        return case
    ignored = sorted(set(entry) - set(OPENS2V_KEYS) - set(CASE_SETTINGS) - set(OPENS2V_LABELS))
    if ignored:  # the benchmark's files may carry more annotations; say so rather than drop them silently
        log.warning("case %s: key(s) %s are not generation inputs and are not used", key, ", ".join(ignored))
    _fill(case, entry.get("prompt"), entry.get("img_paths"), entry.get("masks"), entry.get("seed"), entry,
          "img_paths")
    return case


def _fill(case: Case, prompt: Any, refs: Any, masks: Any, seed: Any, entry: dict, refs_key: str) -> None:
    case.prompt, case.seed = prompt, seed
    if not isinstance(prompt, str):
        case.problems.append("\"prompt\" is missing or not text")
    if not isinstance(refs, list) or not refs or not all(isinstance(r, str) and r for r in refs):
        case.problems.append(f"\"{refs_key}\" must be a non-empty list of image paths")
    else:
        case.refs = list(refs)
    if masks is not None:
        if not isinstance(masks, list) or not all(isinstance(m, str) and m for m in masks):
            case.problems.append("\"masks\" must be a list of image paths (one per reference)")
        else:
            case.masks = list(masks)
    for key, (name, kind) in CASE_SETTINGS.items():
        if key not in entry:
            continue
        value = entry[key]
        if isinstance(value, bool) or not isinstance(value, kind):
            expected = "a whole number" if kind is int else "a number" if kind is not str else "text"
            case.problems.append(f"{key} must be {expected}, got {value!r}")
        else:
            case.settings[name] = value


def _check_ids(cases: list[Case]) -> None:
    """Ids name files: they must be valid file names and distinct even where case does not count."""
    seen: dict[str, str] = {}
    for case in cases:
        if not ID_PATTERN.fullmatch(case.id):
            case.problems.append("the id names its output file: use letters, digits, '.', '_' and '-' only (no "
                                 "leading dot, at most 128 characters)")
        other = seen.get(case.id.lower())
        if other is not None:
            case.problems.append(f"same output file as case {other} (ids must differ, also in upper/lower case)")
        seen.setdefault(case.id.lower(), case.id)

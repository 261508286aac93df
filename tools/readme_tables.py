"""Write the README's figures from the code: the regions between ``<!-- generated:NAME -->`` and
``<!-- /generated:NAME -->`` are rewritten, everything else is left as it is.

    python tools/readme_tables.py            # rewrite README.md
    python tools/readme_tables.py --check    # exit 1 if a region is out of date (run in CI)

Regions: ``vram`` (the DiT stage's memory estimate, bindweave_core.memory), ``training-memory`` (the
trainer's estimate, training/memory_estimate.py), ``node-count`` (nodes/specs.py), ``parity`` (the
DiT's distance to the official outputs, as tests/test_official_parity.py measured and recorded it in
docs/official_parity.json) and ``options`` (the ``generate`` options that take one of a list of values).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

README = REPO / "README.md"
PARITY_RECORD = REPO / "docs" / "official_parity.json"  # written by tests/test_official_parity.py --update-record
GiB = 1 << 30
# Cards by their marketed size and the memory a run can expect free on them (total less the CUDA context
# and a desktop): 24 GB -> 22.5 GiB, the figure the memory check's suggestions are tuned for.
CARDS = ((16, 14.5), (24, 22.5), (32, 30.5), (40, 38.5), (48, 46.5), (80, 77.5), (141, 137.5))

# The DiT stage rows: (width, height, weights, CFG, blocks on the GPU; None = all).
VRAM_ROWS = [
    (832, 480, "bf16", "batched", None), (832, 480, "bf16", "separate", None), (832, 480, "fp8", "batched", None),
    (832, 480, "fp8", "separate", None), (832, 480, "fp8", "separate", 36), (832, 480, "bf16", "separate", 17),
    (832, 480, "fp8", "separate", 0), (1280, 720, "bf16", "batched", None), (1280, 720, "bf16", "separate", None),
    (1280, 720, "fp8", "separate", None), (1280, 720, "fp8", "separate", 16), (1280, 720, "fp8", "separate", 0),
]
FRAMES = 81
# The training rows: (label, TrainConfig changes, width, height, frames).
TRAINING_ROWS = [
    ("bf16 base, rank 32", {"lora": {"rank": 32}}, 832, 480, 81),
    ("fp8 base, rank 32", {"model": {"weight_format": "fp8"}, "lora": {"rank": 32}}, 832, 480, 81),
    ("fp8 base, rank 32", {"model": {"weight_format": "fp8"}, "lora": {"rank": 32}}, 832, 480, 49),
    ("fp8 base, rank 16", {"model": {"weight_format": "fp8"}, "lora": {"rank": 16}}, 480, 272, 33),
    ("fp8, rank 32, `blocks_to_swap: 20`, `activation_offload`",
     {"model": {"weight_format": "fp8"}, "lora": {"rank": 32},
      "train": {"blocks_to_swap": 20, "activation_offload": True}}, 832, 480, 81),
    ("fp8, rank 16, `blocks_to_swap: 30`, `activation_offload`, `adamw8bit`",
     {"model": {"weight_format": "fp8"}, "lora": {"rank": 16},
      "train": {"blocks_to_swap": 30, "activation_offload": True, "optimizer": "adamw8bit"}}, 832, 480, 49),
    ("bf16 base, rank 32", {"lora": {"rank": 32}}, 1280, 720, 81),
]


def smallest_card(total_bytes: float, margin: float) -> str:
    """The smallest card whose free memory holds ``total_bytes`` with ``margin``; "tight" within 10%."""
    for size, free in CARDS:
        if total_bytes * margin <= free * GiB:
            return f"{size} GB" + (" (tight)" if total_bytes * margin > 0.9 * free * GiB else "")
    return f"more than {CARDS[-1][0]} GB (use offload)"


def _step_pflop(width: int, height: int, config) -> float:
    """Multiply-adds x 2 of one guided step (two DiT calls): linear layers and attention."""
    from bindweave_core import constants as C
    from bindweave_core.memory import TYPICAL_PLANNER_TOKENS, token_count

    tokens, context = token_count(width, height, FRAMES), C.CLIP_CONTEXT_TOKENS + TYPICAL_PLANNER_TOKENS + C.TEXT_LEN
    d, f = config.dim, config.ffn_dim
    per_block = (4 * 2 * tokens * d * d + 2 * 2 * tokens * tokens * d  # self-attention
                 + 2 * 2 * tokens * d * d + 2 * 2 * context * d * d + 2 * 2 * tokens * context * d  # cross
                 + 2 * 2 * tokens * d * f)  # FFN
    return 2 * per_block * config.num_layers / 1e15


def vram_table() -> str:
    import torch

    from bindweave_core.config import PRESETS
    from bindweave_core.memory import FIT_MARGIN, RunShape, estimate_vram

    config = PRESETS["bindweave-14b"]
    lines = ["| size | weights | CFG | blocks on GPU | peak VRAM (estimate) | smallest card | compute/step |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for w, h, weights, cfg, resident in VRAM_ROWS:
        shape = RunShape(w, h, FRAMES, batch=2 if cfg == "batched" else 1, dtype=torch.bfloat16,
                         weight_format="fp8" if weights == "fp8" else "default", resident_blocks=resident)
        est = estimate_vram(config, shape)
        blocks = config.num_layers if resident is None else f"{resident} (`--block-offload {resident}`)"
        lines.append(f"| {w}x{h} | {weights} | {cfg} | {blocks} | {est.total / GiB:.1f} GiB | "
                     f"{smallest_card(est.total, FIT_MARGIN)} | {_step_pflop(w, h, config):.1f} PFLOP |")
    return "\n" + "\n".join(lines) + "\n"


def training_table() -> str:
    from bindweave_core.config import PRESETS
    from training.config import TrainConfig
    from training.memory_estimate import estimate_training
    from training.model import lora_parameter_count

    config = PRESETS["bindweave-14b"]
    lines = ["| setup (one GPU, or per GPU with DDP) | DiT weights | LoRA + optimizer | activations | total (estimate) "
             "| smallest card |",
             "| --- | --- | --- | --- | --- | --- |"]
    for label, changes, w, h, n in TRAINING_ROWS:
        sections = {"model": {"smoke": True}, "data": {"path": "x"}}
        for key, values in changes.items():
            sections[key] = {**sections.get(key, {}), **values}
        cfg = TrainConfig.from_dict(sections)
        est = estimate_training(cfg, config, w, h, n, lora_parameter_count(config, cfg.lora.targets, cfg.lora.rank))
        lines.append(f"| {label}, {w}x{h}, {n} frames | {est.weights / GiB:.1f} GiB | {est.lora / GiB:.1f} GiB | "
                     f"{est.activations / GiB:.1f} GiB | {est.total / GiB:.1f} GiB | {smallest_card(est.total, 1.0)} |")
    return "\n" + "\n".join(lines) + "\n"


def node_count() -> str:
    from nodes.specs import ALL_SPECS

    return str(len(ALL_SPECS))


def parity_figure() -> str:
    record = json.loads(PARITY_RECORD.read_text())
    worst = max(record["max_abs_diff"].values())
    return f"{worst:.1e} (fp32, largest of {len(record['max_abs_diff'])} cases; the tests allow {record['tolerance']:.0e})"


def options_table() -> str:
    """Every ``generate`` option with a fixed list of values, read off the command line's own parser."""
    import argparse

    from bindweave_core.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    generate = sub.choices["generate"]
    lines = ["| option | values | default |", "| --- | --- | --- |"]
    for action in generate._actions:
        if action.choices and action.option_strings:
            default = f"`{action.default}`" if action.default is not None else "see `--help`"
            lines.append(f"| `{action.option_strings[-1]}` | {', '.join(f'`{v}`' for v in action.choices)} | {default} |")
    return "\n" + "\n".join(lines) + "\n"


REGIONS: dict[str, Callable[[], str]] = {"vram": vram_table, "training-memory": training_table,
                                         "node-count": node_count, "parity": parity_figure, "options": options_table}
_REGION = re.compile(r"(<!-- generated:([a-z-]+) -->)(.*?)(<!-- /generated:\2 -->)", re.S)


def render(text: str) -> str:
    """``text`` with every generated region rewritten; a missing or unknown region is an error."""
    found = [m.group(2) for m in _REGION.finditer(text)]
    missing, unknown = sorted(set(REGIONS) - set(found)), sorted(set(found) - set(REGIONS))
    if missing or unknown or len(found) != len(set(found)):
        raise SystemExit(f"README regions: missing {missing}, unknown {unknown}, found {found} (each region once)")
    return _REGION.sub(lambda m: m.group(1) + REGIONS[m.group(2)]() + m.group(4), text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if README.md is out of date")
    args = ap.parse_args()
    text = README.read_text()
    new = render(text)
    if args.check:
        if new != text:
            stale = [m.group(2) for m, n in zip(_REGION.finditer(text), _REGION.finditer(new)) if m.group(3) != n.group(3)]
            print(f"README.md regions out of date: {', '.join(stale)}. Run: python tools/readme_tables.py")
            return 1
        return 0
    README.write_text(new)
    print(f"wrote {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

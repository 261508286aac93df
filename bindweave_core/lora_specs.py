"""LoRAs given as ``FILE[:STRENGTH]`` (the ``generate --lora`` option) and put on a pipeline's DiT.

    from bindweave_core.pipeline import BindWeavePipeline
    from bindweave_core.lora_specs import add_loras

    pipe = BindWeavePipeline.from_files(dit=..., vae=..., ...)
    add_loras(pipe, ["output/lora/my_subject/my_subject.safetensors:0.8", "style.safetensors"])
    result = pipe.generate(["ref.png"], settings)

The files are read (and their layout checked) at once, before any model loads. A DiT that is still
a loader function (``offload="release"``) gets the LoRAs each time it is loaded; a loaded DiT gets
them now. Default-precision weights are merged (exactly what the trainer's peft layers compute);
fp8 weights get forward hooks instead, so they are not requantised.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from torch import nn

from .errors import InputError
from .lora import AppliedLora, LoraWeights, apply_lora, load_lora

log = logging.getLogger("BindWeave")


def parse_lora_spec(spec: str) -> tuple[Path, float]:
    """``"file.safetensors:0.8"`` -> ``(Path, 0.8)``; no ``:STRENGTH`` means 1.0. Only a number after the
    last colon is a strength, so paths with colons (``C:\\loras\\a.safetensors``) still work."""
    path, sep, tail = spec.rpartition(":")
    strength = 1.0
    if sep:
        try:
            strength = float(tail)
        except ValueError:
            path = spec  # the colon belongs to the path
        else:
            if not math.isfinite(strength):
                raise InputError(f"--lora {spec}: the strength must be a finite number, got {tail!r}.")
    else:
        path = spec
    p = Path(path)
    if not p.is_file():
        raise InputError(f"--lora {spec}: no LoRA file at {p}. Give FILE or FILE:STRENGTH (e.g. my.safetensors:0.8).")
    return p, strength


def load_lora_specs(specs: list[str]) -> list[tuple[LoraWeights, float]]:
    """Read every ``FILE[:STRENGTH]`` (clear errors for missing, damaged or foreign files)."""
    out = []
    for spec in specs:
        path, strength = parse_lora_spec(spec)
        out.append((load_lora(path), strength))
    return out


def _has_fp8(dit: nn.Module) -> bool:
    return any(hasattr(m, "scale_weight") for m in dit.modules())


def apply_loras(dit: nn.Module, loras: list[tuple[LoraWeights, float]]) -> list[AppliedLora]:
    """Put every LoRA on ``dit`` (merged; hooks for fp8 weights); ``.remove()`` each to take it off."""
    mode = "hooks" if _has_fp8(dit) else "merge"
    return [apply_lora(dit, lora, strength, mode=mode) for lora, strength in loras]


def add_loras(pipe: Any, specs: list[str]) -> list[tuple[LoraWeights, float]]:
    """Read ``specs`` and put the LoRAs on the pipeline's DiT (now, or whenever it is loaded)."""
    loras = load_lora_specs(specs)
    if not loras:
        return loras
    if pipe.current("dit") is None:
        raise InputError("--lora needs a DiT: this pipeline has none.")

    def with_loras(dit: nn.Module) -> nn.Module:
        apply_loras(dit, loras)
        return dit

    pipe.transform_component("dit", with_loras)  # now, or each time the DiT is loaded
    log.info("LoRA: %s", ", ".join(f"{s} (strength {w:g})" for (_, w), s in zip(loras, specs)))
    return loras

"""LoRAs given as ``FILE[:STRENGTH]`` (the ``generate --lora`` option) and put on a pipeline's DiT.

    from bindweave_core.pipeline import BindWeavePipeline
    from bindweave_core.lora_specs import add_loras

    pipe = BindWeavePipeline.from_files(dit=..., vae=..., ...)
    add_loras(pipe, ["output/lora/my_subject/my_subject.safetensors:0.8", "style.safetensors"])
    result = pipe.generate(["ref.png"], settings)

The files are read (their layout and values checked: NaN/inf is refused) at once, and checked against
the DiT's shapes, before any model runs: a DiT still to be loaded is built on the meta device from its
file header's configuration (no weights read). A DiT that is still
a loader function (``offload="release"``) gets the LoRAs each time it is loaded; a loaded DiT gets
them now. Default-precision weights are merged (exactly what the trainer's peft layers compute);
fp8 weights get forward hooks instead, so they are not requantised.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, InputError
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


def check_loras_fit(dit: Any, loras: list[tuple[LoraWeights, float]], specs: list[str]) -> None:
    """Each LoRA's entries against the DiT's modules and shapes: a loaded DiT as it is, a DiT still to be
    loaded (:class:`~bindweave_core.lazy.Lazy` with its configuration read from the file header) as an empty
    meta-device model of that configuration. Nothing is loaded; a loader without a configuration is checked
    when it loads."""
    from .lazy import Lazy

    if isinstance(dit, Lazy):
        config = (dit.meta or {}).get("config")
        if config is None:
            return
        from .dit.transformer import BindWeaveTransformer

        with torch.device("meta"):
            dit = BindWeaveTransformer(config)
    for (lora, _), spec in zip(loras, specs):
        try:
            lora.check(dit)
        except CheckpointError as e:
            raise CheckpointError(f"--lora {spec}: {e}") from None


def _has_fp8(dit: nn.Module) -> bool:
    return any(hasattr(m, "scale_weight") for m in dit.modules())


def apply_loras(dit: nn.Module, loras: list[tuple[LoraWeights, float]]) -> list[AppliedLora]:
    """Put every LoRA on ``dit`` (merged; hooks for fp8 weights); ``.remove()`` each to take it off."""
    mode = "hooks" if _has_fp8(dit) else "merge"
    return [apply_lora(dit, lora, strength, mode=mode) for lora, strength in loras]


def add_loras(pipe: Any, specs: list[str],
              loaded: list[tuple[LoraWeights, float]] | None = None) -> list[tuple[LoraWeights, float]]:
    """Read ``specs`` (or take them ``loaded`` by :func:`load_lora_specs`), check them against the DiT's shapes
    and put them on the pipeline's DiT (now, or whenever it is loaded)."""
    loras = load_lora_specs(specs) if loaded is None else loaded
    if not loras:
        return loras
    if pipe.current("dit") is None:
        raise InputError("--lora needs a DiT: this pipeline has none.")
    check_loras_fit(pipe.current("dit"), loras, specs)

    def with_loras(dit: nn.Module) -> nn.Module:
        apply_loras(dit, loras)
        return dit

    pipe.transform_component("dit", with_loras)  # now, or each time the DiT is loaded
    log.info("LoRA: %s", ", ".join(f"{s} (strength {w:g})" for (_, w), s in zip(loras, specs)))
    return loras

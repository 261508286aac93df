"""LoRA files for the BindWeave / Wan DiT: reading the layouts users have, applying, saving ours.

Everything is keyed by our DiT's names (diffusers Wan names: ``blocks.0.attn1.to_q``). Layouts read:

* ours (written by the trainer and :func:`save_lora`): the original Wan names behind the
  ``diffusion_model.`` prefix, ``<name>.lora_A.weight`` ``[rank, in]``, ``<name>.lora_B.weight``
  ``[out, rank]`` and ``<name>.alpha`` (scalar); a fully trained connector as weight differences
  ``diffusion_model.text_projection.{0,2}.diff`` / ``.diff_b``. ComfyUI's own LoRA loader reads
  this for its native Wan model (``model_lora_keys_unet`` maps ``diffusion_model.<name>``); the
  connector keys have no counterpart there and are skipped by it (with its "lora key not loaded"
  warning);
* diffusers / peft: ``transformer.blocks.0.attn1.to_q.lora_A.weight`` (also ``base_model.model.``
  and peft's ``.lora_A.default.weight``);
* original Wan names: ``diffusion_model.blocks.0.self_attn.q.lora_A.weight`` or ``.lora_down`` /
  ``.lora_up``, with or without ``.alpha``;
* kohya style: ``lora_unet_blocks_0_self_attn_q.lora_down.weight`` / ``.lora_up.weight`` /
  ``.alpha`` (step-distilled Wan LoRAs; also ``lora_unet__`` of Wan-Fun files);
* ``.diff`` / ``.diff_b`` full differences on any weight or bias (norms, biases, modulation);
* lightx2v's step-distill LoRAs (``lightx2v_I2V_14B_480p_cfg_step_distill_rank64_bf16``, made by
  ModelTC/LightX2V ``tools/extract/lora_extractor.py``): original names, ``lora_down``/``lora_up``
  without ``.alpha`` (scale 1) for the large linears, ``.diff`` for the norms, the patch embedding and
  other small weights, ``.diff_b`` for biases, and ``blocks.N.diff_m`` / ``head.diff_m`` for the
  ``modulation`` tables (read as ``blocks.N.modulation.diff``).

The original <-> diffusers renaming is diffusers' own Wan converter (through
``checkpoints.dit_layout.original_to_diffusers``); the reverse direction is a short table whose every entry is
checked against that converter.

The scale of a pair is ``alpha / rank`` (``alpha`` absent: 1), as in peft, kohya and ComfyUI:
``W' = W + strength * alpha / rank * (up @ down)``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CheckpointError

log = logging.getLogger("BindWeave")

FORMAT_KEY = "bindweave_lora_format"  # metadata key marking our files; value FORMAT_VERSION
FORMAT_VERSION = "1"
CONFIG_KEY = "bindweave_training_config"  # metadata: the training config (YAML as a JSON string)
SAVE_PREFIX = "diffusion_model."
APPLY_MODES = ("merge", "hooks")

# The linears a LoRA targets by default: attention (self, text cross, image cross) and FFN of every block.
DEFAULT_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                   "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
                   "attn2.add_k_proj", "attn2.add_v_proj", "ffn.net.0.proj", "ffn.net.2")
CONNECTOR = "condition_embedder.text_projector"

# Stored-key suffixes, longest first: (suffix, role).
_SUFFIXES = (
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".alpha", "alpha"), (".diff_b", "diff_b"), (".diff", "diff"),
)
# Prefixes tools put in front of dotted names, and of kohya's underscored names.
_DOTTED_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "unet.")
_KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_", "lycoris_")

# diffusers name fragment -> original Wan fragment, applied in order (norm2/norm3 swap through a placeholder).
_TO_ORIGINAL = (
    ("condition_embedder.text_projector.linear_1", "text_projection.0"),
    ("condition_embedder.text_projector.linear_2", "text_projection.2"),
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("condition_embedder.image_embedder.norm1", "img_emb.proj.0"),
    ("condition_embedder.image_embedder.ff.net.0.proj", "img_emb.proj.1"),
    ("condition_embedder.image_embedder.ff.net.2", "img_emb.proj.3"),
    ("condition_embedder.image_embedder.norm2", "img_emb.proj.4"),
    (".attn1.", ".self_attn."), (".attn2.", ".cross_attn."),
    (".to_out.0", ".o"), (".to_q", ".q"), (".to_k", ".k"), (".to_v", ".v"),
    (".add_k_proj", ".k_img"), (".add_v_proj", ".v_img"), (".norm_added_k", ".norm_k_img"),
    (".ffn.net.0.proj", ".ffn.0"), (".ffn.net.2", ".ffn.2"),
    (".norm2", ".norm_swap_"), (".norm3", ".norm2"), (".norm_swap_", ".norm3"),
    (".scale_shift_table", ".modulation"),
)
_TOP_LEVEL_ORIGINAL = {"proj_out": "head.head", "scale_shift_table": "head.modulation"}


# ------------------------------------------------------------------------------------------ types
@dataclass
class LoraLayer:
    """One low-rank pair: ``delta W = alpha / rank * up @ down``."""

    down: torch.Tensor  # [rank, in_features]  (lora_A / lora_down)
    up: torch.Tensor  # [out_features, rank]  (lora_B / lora_up)
    alpha: float | None = None  # None: alpha = rank (scale 1)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else float(self.alpha) / self.rank

    def delta(self, strength: float = 1.0, dtype: torch.dtype = torch.float32,
              device: torch.device | str | None = None) -> torch.Tensor:
        """``strength * alpha / rank * up @ down`` as a ``[out, in]`` matrix."""
        up = self.up.to(device=device, dtype=torch.float32)
        down = self.down.to(device=device, dtype=torch.float32)
        return ((up @ down) * (self.scale * strength)).to(dtype)


@dataclass
class LoraWeights:
    """A LoRA mapped onto our DiT's names.

    ``layers``: module name (``blocks.0.attn1.to_q``) -> :class:`LoraLayer`, patching that module's
    ``.weight``. ``diffs``: parameter name (``condition_embedder.text_projector.linear_1.weight``,
    ``blocks.0.norm2.bias``, ``blocks.0.scale_shift_table``) -> full difference added to it.
    """

    layers: dict[str, LoraLayer] = field(default_factory=dict)
    diffs: dict[str, torch.Tensor] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    source_format: str = "bindweave"  # bindweave | diffusers | wan-original | kohya
    skipped: list[str] = field(default_factory=list)  # stored keys not understood (DoRA scales, ...)

    def weight_patches(self) -> dict[str, LoraLayer]:
        """``{parameter name: LoraLayer}``: what a weight patcher (ComfyUI's ModelPatcher) needs."""
        return {f"{name}.weight": layer for name, layer in self.layers.items()}

    @property
    def ranks(self) -> set[int]:
        return {layer.rank for layer in self.layers.values()}

    @property
    def training_config(self) -> dict[str, Any] | None:
        raw = self.metadata.get(CONFIG_KEY)
        return json.loads(raw) if raw else None

    def __repr__(self) -> str:
        return (f"LoraWeights({len(self.layers)} pairs, ranks {sorted(self.ranks)}, {len(self.diffs)} diffs, "
                f"format {self.source_format})")

    def check(self, model: nn.Module) -> None:
        """Raise naming every entry that has no counterpart (or the wrong shape) in ``model``."""
        missing, wrong = [], []
        for name, layer in self.layers.items():
            module = _target_module(model, name)
            if module is None or not hasattr(module, "in_features"):
                missing.append(name)
            elif tuple(layer.down.shape) != (layer.rank, module.in_features) or \
                    tuple(layer.up.shape) != (module.out_features, layer.rank):
                wrong.append(f"{name} (LoRA {list(layer.up.shape)} x {list(layer.down.shape)}, "
                             f"layer {module.out_features} x {module.in_features})")
        for name, diff in self.diffs.items():
            p = _target_param(model, name)
            if p is None:
                missing.append(name)
            elif tuple(p.shape) != tuple(diff.shape):
                wrong.append(f"{name} (diff {list(diff.shape)}, parameter {list(p.shape)})")
        problems = []
        if missing:
            problems.append(f"{len(missing)} entries match nothing in this model: {_listing(missing)}")
        if wrong:
            problems.append(f"{len(wrong)} entries have the wrong shape: {_listing(wrong)}")
        if problems:
            raise CheckpointError("this LoRA does not fit the model: " + "; ".join(problems) + ". It was made "
                                  "for another model (e.g. Wan 1.3B vs 14B, or text- vs image-to-video).")


def _listing(items: list[str], limit: int = 8) -> str:
    return ", ".join(items[:limit]) + (f" ... (+{len(items) - limit})" if len(items) > limit else "")


# ------------------------------------------------------------------------------------------ names
def original_name(name: str) -> str:
    """Our (diffusers) module or parameter name -> the original Wan name (``blocks.0.self_attn.q``)."""
    if name in _TOP_LEVEL_ORIGINAL:
        return _TOP_LEVEL_ORIGINAL[name]
    out = "." + name
    for ours, theirs in _TO_ORIGINAL:
        out = out.replace(ours, theirs)
    return out[1:]


@functools.lru_cache(maxsize=8)
def dit_name_table(num_layers: int) -> dict[str, tuple[str, str]]:
    """alias -> (kind, our name) for every weight-bearing module and bare parameter of a DiT with
    ``num_layers`` blocks (built on the meta device, cached): how LoRA keys of any layout find our modules,
    and how the trainer checks ``lora.targets`` before any model loads.

    kind is ``module`` (a module with a ``weight``) or ``param`` (e.g. ``scale_shift_table``).
    Aliases: our name, the original name (only where diffusers' converter maps it back to ours),
    and both with dots as underscores (kohya).
    """
    from .checkpoints.dit_layout import original_to_diffusers
    from .config import PRESETS
    from .dit.transformer import BindWeaveTransformer

    with torch.device("meta"):  # the bindweave family has every module a Wan LoRA can name
        model = BindWeaveTransformer(PRESETS["tiny"].replace(num_layers=max(1, num_layers)))
    entries: list[tuple[str, str, str]] = []  # (kind, our name, suffix of the real tensor)
    for mod_name, module in model.named_modules():
        if mod_name and isinstance(module._parameters.get("weight"), torch.Tensor):
            entries.append(("module", mod_name, ".weight"))
        for leaf, p in module._parameters.items():
            if p is not None and leaf not in ("weight", "bias"):
                entries.append(("param", f"{mod_name}.{leaf}" if mod_name else leaf, ""))
    converted, _ = original_to_diffusers([original_name(ours) + suffix for _, ours, suffix in entries], "")
    table: dict[str, tuple[str, str]] = {}
    for kind, ours, suffix in entries:
        names = [ours]
        if converted.get(ours + suffix) == original_name(ours) + suffix:
            names.append(original_name(ours))
        for n in names:
            table.setdefault(n, (kind, ours))
            table.setdefault(n.replace(".", "_"), (kind, ours))
    return table


def _num_layers(bases: list[str]) -> int:
    found = [int(m.group(1)) for b in bases if (m := re.search(r"blocks[._](\d+)[._]", b))]
    return max(found) + 1 if found else 1


def _split_key(key: str) -> tuple[str, str] | None:
    for suffix, role in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def _normalise(base: str) -> tuple[str, str]:
    """Strip tool prefixes: ``(name, style)`` with style ``kohya`` (underscored) or ``dotted``."""
    if base.startswith("lora_unet__"):  # Wan-Fun files
        base = "lora_unet_" + base[len("lora_unet__"):]
    for p in _KOHYA_PREFIXES:
        if base.startswith(p):
            return base[len(p):], "kohya"
    stripped = True
    while stripped:
        stripped = False
        for p in _DOTTED_PREFIXES:
            if base.startswith(p):
                base, stripped = base[len(p):], True
    return base, "dotted"


# ------------------------------------------------------------------------------------------ reading
def check_lora_finite(state_dict: dict[str, torch.Tensor], source: str = "LoRA") -> None:
    """Every tensor of a LoRA holds finite values (LoRAs are small: all of it is read). A NaN merged into the
    DiT makes every later value NaN: an all-black video with no error."""
    for key, value in state_dict.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            nan, inf = int(torch.isnan(value).sum()), int(torch.isinf(value).sum())
            raise CheckpointError(f"{source}: tensor {key} holds non-finite values ({nan} NaN, {inf} inf of "
                                  f"{value.numel()}); merging it would make every frame NaN (a black video). The "
                                  "LoRA is damaged or came from a training run that diverged: re-download it, or "
                                  "train again (a lower learning rate) and use a checkpoint from before the loss "
                                  "became NaN.")


def lora_from_state_dict(state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                         *, source: str = "LoRA", strict: bool = True) -> LoraWeights:
    """Map a LoRA state dict in any supported layout onto our DiT's names.

    ``strict``: keys that name no DiT module raise :class:`CheckpointError` (listed); otherwise they
    are skipped with a warning.
    """
    metadata = dict(metadata or {})
    check_lora_finite(state_dict, source)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    skipped: list[str] = []
    for key, value in state_dict.items():
        if key.endswith(".diff_m"):  # lightx2v: the modulation table of a block or of the head
            key = key[: -len(".diff_m")] + ".modulation.diff"
        split = _split_key(key)
        if split is None:
            skipped.append(key)
            continue
        groups.setdefault(split[0], {})[split[1]] = value
    if not any({"down", "up", "diff", "diff_b"} & set(g) for g in groups.values()):
        from .checkpoints.identify import describe

        raise CheckpointError(f"{source}: not a LoRA: it has no lora_A/lora_B, lora_down/lora_up or .diff weights "
                              f"(it looks like {describe(list(state_dict))}).")

    table = dit_name_table(_num_layers(list(groups)))
    out = LoraWeights(metadata=metadata, skipped=skipped)
    unmatched, styles = [], set()
    for base, parts in groups.items():
        name, style = _normalise(base)
        target = table.get(name)
        if target is None:
            unmatched.append(base)
            continue
        kind, ours = target
        if style == "kohya":
            styles.add("kohya")
        elif name != ours:
            styles.add("wan-original")
        elif name != original_name(ours):  # names both layouts share (patch_embedding) say nothing
            styles.add("diffusers")
        if "down" in parts or "up" in parts:
            if not ("down" in parts and "up" in parts):
                raise CheckpointError(f"{source}: {base} has only one half of its LoRA pair "
                                      f"({'lora_A/down' if 'down' in parts else 'lora_B/up'}); the file is incomplete.")
            if kind != "module" or parts["down"].ndim != 2 or parts["up"].ndim != 2:
                skipped.append(base)  # e.g. conv LoRAs on the patch embedding: not supported
                continue
            alpha = parts.get("alpha")
            out.layers[ours] = LoraLayer(parts["down"], parts["up"], float(alpha.item()) if alpha is not None else None)
        if "diff" in parts:
            out.diffs[f"{ours}.weight" if kind == "module" else ours] = parts["diff"]
        if "diff_b" in parts:
            out.diffs[f"{ours}.bias"] = parts["diff_b"]
    if unmatched:
        msg = (f"{source}: {len(unmatched)} LoRA entries name no module of a Wan/BindWeave DiT: "
               f"{_listing(sorted(unmatched))}")
        if strict or not (out.layers or out.diffs):
            raise CheckpointError(msg + ". The LoRA was made for another model.")
        log.warning("%s; skipped", msg)
    if skipped:
        log.warning("%s: %d keys not used (unsupported kinds such as DoRA scales): %s", source, len(skipped),
                    _listing(skipped))
    out.source_format = "bindweave" if metadata.get(FORMAT_KEY) else "+".join(sorted(styles)) or "unknown"
    return out


def load_lora(path: str | os.PathLike, *, strict: bool = True) -> LoraWeights:
    """Read a LoRA file (any layout of the module docstring) with the checkpoint readers' clear errors
    for missing, truncated or foreign files."""
    from .checkpoints.safetensors_io import iter_tensors, read_header

    infos, metadata = read_header(path)
    state = {info.key: tensor.clone() for info, tensor in iter_tensors(list(infos.values()))}
    return lora_from_state_dict(state, metadata, source=str(path), strict=strict)


# ------------------------------------------------------------------------------------------ writing
def lora_state_dict(lora: LoraWeights, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Our file layout (see the module docstring) as a state dict."""
    def cast(t: torch.Tensor) -> torch.Tensor:
        return (t.to(dtype) if dtype is not None else t).detach().cpu().contiguous()

    sd: dict[str, torch.Tensor] = {}
    for name, layer in sorted(lora.layers.items()):
        base = SAVE_PREFIX + original_name(name)
        sd[f"{base}.lora_A.weight"] = cast(layer.down)
        sd[f"{base}.lora_B.weight"] = cast(layer.up)
        sd[f"{base}.alpha"] = torch.tensor(float(layer.alpha if layer.alpha is not None else layer.rank))
    for name, diff in sorted(lora.diffs.items()):
        module, _, leaf = name.rpartition(".")
        if leaf == "weight":
            key = f"{SAVE_PREFIX}{original_name(module)}.diff"
        elif leaf == "bias":
            key = f"{SAVE_PREFIX}{original_name(module)}.diff_b"
        else:
            key = f"{SAVE_PREFIX}{original_name(name)}.diff"
        sd[key] = cast(diff)
    return sd


def save_lora(lora: LoraWeights, path: str | os.PathLike, *, metadata: dict[str, str] | None = None,
              dtype: torch.dtype | None = None) -> Path:
    """Write ``lora`` in our layout (atomically); ``metadata`` values must be strings."""
    from .checkpoints.writers import atomic_save_file

    meta = {**lora.metadata, **(metadata or {}), FORMAT_KEY: FORMAT_VERSION}
    return atomic_save_file(lora_state_dict(lora, dtype), path, metadata={k: str(v) for k, v in meta.items()})


# ------------------------------------------------------------------------------------------ applying
def _target_module(model: nn.Module, name: str) -> nn.Module | None:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return None
    return getattr(module, "base_layer", module)  # a peft-wrapped layer: patch the base


def _target_param(model: nn.Module, name: str) -> torch.Tensor | None:
    module_name, _, leaf = name.rpartition(".")
    module = _target_module(model, module_name) if module_name else model
    if module is None:
        return None
    p = getattr(module, leaf, None)
    return p if isinstance(p, torch.Tensor) else None


def _is_fp8(module: nn.Module) -> bool:
    return hasattr(module, "scale_weight") and module.weight.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


def _add_to_weight(module: nn.Module, delta: torch.Tensor) -> None:
    """``weight += delta``; fp8 weights are dequantised, merged and requantised with a fresh scale."""
    from .fp8 import quantize_weight

    w = module.weight
    if _is_fp8(module):
        merged = w.float() * module.scale_weight.float() + delta.to(w.device)
        q, scale = quantize_weight(merged)
        w.data.copy_(q)
        module.scale_weight.data.copy_(scale.to(module.scale_weight.device))
    else:
        w.data.copy_((w.float() + delta.to(w.device)).to(w.dtype))


@dataclass
class AppliedLora:
    """A LoRA applied to a model; :meth:`remove` takes it off again."""

    model: nn.Module
    lora: LoraWeights
    strength: float
    mode: str
    handles: list[Any] = field(default_factory=list)
    backups: dict[str, torch.Tensor] = field(default_factory=dict)  # parameter name -> original value
    active: bool = True

    def remove(self) -> None:
        """Undo the LoRA. Hooks and backed-up parameters come back exactly; merged weights without a
        backup are unmerged by subtraction (exact to rounding of the weights' dtype; fp8 requantised)."""
        if not self.active:
            return
        for h in self.handles:
            h.remove()
        with torch.no_grad():
            for name, value in self.backups.items():
                param = _target_param(self.model, name)
                param.data.copy_(value.to(param.device))
            if self.mode == "merge":
                for name, layer in self.lora.layers.items():
                    if f"{name}.weight" not in self.backups:
                        _add_to_weight(_target_module(self.model, name), layer.delta(-self.strength))
        self.active = False


def apply_lora(model: nn.Module, lora: LoraWeights, strength: float = 1.0, *, mode: str = "merge",
               keep_original: bool = False) -> AppliedLora:
    """Apply ``lora`` to ``model`` (our DiT) with ``strength``.

    ``mode="merge"`` adds the deltas into the weights (fp8 weights: dequantise, merge, requantise);
    ``keep_original`` keeps a CPU copy of every touched weight so that ``remove()`` is exact.
    ``mode="hooks"`` leaves the weights alone and adds ``strength * scale * up(down(x))`` to each
    patched linear's output (non-destructive; fp8 weights untouched). Full differences (``diffs``)
    are merged in both modes, with a backup (they are small: connector, norms, biases).
    """
    if mode not in APPLY_MODES:
        raise ValueError(f"mode must be one of {APPLY_MODES}, got {mode!r}")
    lora.check(model)
    applied = AppliedLora(model, lora, float(strength), mode)
    with torch.no_grad():
        for name, diff in lora.diffs.items():
            module_name, _, leaf = name.rpartition(".")
            module = _target_module(model, module_name) if module_name else model
            param = getattr(module, leaf)
            applied.backups[name] = param.detach().to("cpu", copy=True)
            if leaf == "weight" and _is_fp8(module):
                applied.backups[f"{module_name}.scale_weight"] = module.scale_weight.detach().to("cpu", copy=True)
                _add_to_weight(module, diff.float() * strength)
            else:
                param.data.copy_((param.float() + diff.to(param.device).float() * strength).to(param.dtype))
        for name, layer in lora.layers.items():
            module = _target_module(model, name)
            if mode == "hooks":
                applied.handles.append(module.register_forward_hook(_lora_hook(layer, float(strength))))
                continue
            if keep_original:
                applied.backups[f"{name}.weight"] = module.weight.detach().to("cpu", copy=True)
                if _is_fp8(module):
                    applied.backups[f"{name}.scale_weight"] = module.scale_weight.detach().to("cpu", copy=True)
            _add_to_weight(module, layer.delta(strength, device=module.weight.device))
    log.info("applied LoRA (%d pairs, %d diffs) with strength %.3g by %s", len(lora.layers), len(lora.diffs),
             strength, mode)
    return applied


def _lora_hook(layer: LoraLayer, strength: float):
    cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
    factor = layer.scale * strength

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        key = (x.device, x.dtype)
        if key not in cache:  # moved once per device/dtype, not per call
            cache[key] = (layer.down.to(device=x.device, dtype=x.dtype), layer.up.to(device=x.device, dtype=x.dtype))
        down, up = cache[key]
        return output + F.linear(F.linear(x, down), up).mul_(factor).to(output.dtype)

    return hook

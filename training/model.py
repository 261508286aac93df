"""The models of a training run: the encoders for the cache step, the DiT with its peft LoRA.

The base DiT is frozen; peft wraps the targeted linears of every block (``FP8Linear`` too: it
subclasses ``nn.Linear``), with the adapters kept in float32 whatever the base dtype. With
``lora.train_connector`` the connector (``condition_embedder.text_projector``) is trained fully in
float32 and exported as a weight difference.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bindweave_core.condition_cache import digest, path_identity
from bindweave_core.config import DiTConfig
from bindweave_core.dit.transformer import BindWeaveTransformer
from bindweave_core.dtypes import torch_dtype
from bindweave_core.errors import InputError
from bindweave_core.families import family_for
from bindweave_core.lazy import Lazy
from bindweave_core.lora import CONNECTOR, LoraLayer, LoraWeights, dit_name_table

from .config import TrainConfig

log = logging.getLogger("BindWeave")

ENCODERS = ("planner", "text_encoder", "clip_vision", "vae")
ADAPTER = "default"  # peft adapter name


# ------------------------------------------------------------------------------------------ encoders
@functools.lru_cache(maxsize=2)
def _smoke_encoders(seed: int, family: str) -> dict[str, Any]:
    from bindweave_core.smoke import smoke_components

    comps = smoke_components(seed, family)
    return {k: comps[k] for k in ENCODERS}


def dit_config(cfg: TrainConfig) -> DiTConfig:
    """The DiT's architecture and family from the checkpoint header (nothing loaded), or the smoke preset;
    ``model.family`` overrides the family (e.g. Kaleido weights in a plain Wan layout)."""
    from bindweave_core.config import PRESETS

    m = cfg.model
    if m.smoke:
        return PRESETS[family_for(m.family or "bindweave").smoke_preset]
    from bindweave_core.dit.loading import scan_dit

    config = scan_dit(m.dit).config
    return config.replace(family=m.family) if m.family and m.family != config.family else config


def build_encoders(cfg: TrainConfig) -> dict[str, Any]:
    """The four encoders for :class:`~bindweave_core.pipeline.BindWeavePipeline` (loaders for files)."""
    m = cfg.model
    if m.smoke:
        return dict(_smoke_encoders(m.smoke_seed, m.family or "bindweave"))
    from bindweave_core.encoder_loaders import encoder_loaders

    return encoder_loaders(vae=m.vae, text_encoder=m.text_encoder, clip_vision=m.clip_vision, planner=m.planner,
                           planner_tokenizer=m.planner_tokenizer, text_tokenizer=m.text_tokenizer,
                           dtype=torch_dtype(m.dtype))


def _files(path: str | None) -> Any:
    """The core's file identity of a model path; None for no path, [] for a path not there (its loader says so)."""
    if path is None:
        return None
    return path_identity(path) if Path(path).exists() else []


def encoder_identities(cfg: TrainConfig, encoders: dict[str, Any]) -> dict[str, str | None]:
    """One id per encoder: its files (size + mtime) and dtype, or its weights for in-memory models."""
    m = cfg.model
    files = {"planner": (m.planner, m.planner_tokenizer), "text_encoder": (m.text_encoder, m.text_tokenizer),
             "clip_vision": (m.clip_vision, None), "vae": (m.vae, None)}
    out: dict[str, str | None] = {}
    for name in ENCODERS:
        comp = encoders.get(name)
        if comp is None:
            out[name] = None
        elif isinstance(comp, Lazy):
            weights, tokenizer = files[name]
            # This list's format is kept: the cache keys it feeds also seed the reference augmentation.
            out[name] = digest([_files(weights), _files(tokenizer), m.dtype])
        else:
            out[name] = weights_digest(comp if isinstance(comp, nn.Module) else comp.model)
    return out


def weights_digest(module: nn.Module) -> str:
    """sha256 of every parameter and buffer of a (small, in-memory) model: the smoke encoders' identity.

    Not the core's ``model_identity``, which names an in-memory model for this process only: the feature
    cache is on disk, and its keys also seed the reference augmentation, so this format is kept as it is.
    """
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ the DiT
def load_training_dit(cfg: TrainConfig) -> BindWeaveTransformer:
    """The frozen base DiT (on the CPU; accelerate places it)."""
    m = cfg.model
    config = dit_config(cfg)
    if m.smoke:
        from bindweave_core.smoke import smoke_dit

        dit = smoke_dit(m.smoke_seed, family_for(config).smoke_preset)
        if m.weight_format == "fp8":
            to_fp8(dit)
    else:
        from bindweave_core.dit.loading import load_dit

        dit = load_dit(m.dit, dtype=torch_dtype(m.dtype), weight_format=m.weight_format, attention_backend=m.attention,
                       config=config)
    return dit.requires_grad_(False)


def to_fp8(dit: nn.Module) -> nn.Module:
    """Quantise the block linears of an in-memory DiT to fp8 storage (what ``weight_format: fp8`` loads)."""
    from bindweave_core.fp8 import FP8Linear, fp8_candidate_modules, quantize_weight

    for name in fp8_candidate_modules(dit):
        parent_name, _, leaf = name.rpartition(".")
        parent = dit.get_submodule(parent_name)
        old = getattr(parent, leaf)
        new = FP8Linear(old.in_features, old.out_features, bias=old.bias is not None, device=old.weight.device)
        weight, scale = quantize_weight(old.weight.detach())
        new.weight = nn.Parameter(weight, requires_grad=False)
        new.scale_weight = scale
        if old.bias is not None:
            new.bias = nn.Parameter(old.bias.detach().clone(), requires_grad=False)
        setattr(parent, leaf, new)
    return dit


_BLOCK = "blocks.0."


def _block_modules() -> list[str]:
    """Names inside a block of every module a Wan/BindWeave block can have (image-to-video ones included)."""
    return sorted({ours[len(_BLOCK):] for kind, ours in dit_name_table(1).values() if ours.startswith(_BLOCK)})


def _in_block(target: str) -> str:
    """A ``lora.targets`` name, ours (``attn1.to_q``) or the original (``self_attn.q``), as our name inside a
    block; a name the table does not know comes back unchanged."""
    hit = dit_name_table(1).get(_BLOCK + target)
    return hit[1][len(_BLOCK):] if hit else target


def check_targets(targets: list[str]) -> None:
    """``lora.targets`` against the linears any Wan/BindWeave block has (no model needed: run before caching)."""
    known = _block_modules()
    wrong = [t for t in targets if _in_block(t) not in known]
    if wrong:
        raise InputError(f"lora.targets: {', '.join(map(repr, wrong))} is no linear layer of a DiT block; choose from "
                         f"{', '.join(known)} (or the original names such as self_attn.q, ffn.0).")


def lora_parameter_count(config: DiTConfig, targets: list[str], rank: int) -> int:
    """Trainable LoRA parameters of ``targets`` at ``rank`` over all blocks (counted on a meta model)."""
    with torch.device("meta"):
        block = BindWeaveTransformer(config.replace(num_layers=1)).blocks[0]
    linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    total = 0
    for t in set(targets):
        m = linears.get(_in_block(t))
        if m is not None:
            total += rank * (m.in_features + m.out_features)
    return total * config.num_layers


def target_pattern(dit: nn.Module, targets: list[str]) -> str:
    """peft ``target_modules`` regex for the named linears of every block.

    Names are relative to a block, in our (diffusers) naming (``attn1.to_q``) or the original one
    (``self_attn.q``); a name matching no linear of block 0 is an error that lists the valid ones.
    """
    known = _block_modules()
    present = {n for n, mod in dit.blocks[0].named_modules() if isinstance(mod, nn.Linear)}
    resolved, absent = [], []
    for t in targets:
        name = _in_block(t)
        if name not in present:
            if name not in known:
                raise InputError(f"lora.targets: {t!r} is no linear layer of a DiT block; choose from "
                                 f"{', '.join(sorted(present))}.")
            absent.append(t)
            continue
        resolved.append(re.escape(name))
    if absent:
        log.info("lora.targets %s: not in this %s DiT, skipped", ", ".join(absent), dit.dit_config.family)
    if not resolved:
        raise InputError(f"lora.targets: none of {targets} is in this DiT; choose from {', '.join(sorted(present))}.")
    return r"blocks\.\d+\.(?:" + "|".join(sorted(set(resolved))) + ")"


@contextlib.contextmanager
def _float32_adapters(dit: nn.Module):
    """peft gives new adapters the base layer's dtype (fp8 or bf16 here) unless the layer declares a
    ``compute_dtype``; declaring float32 while injecting keeps the adapters float32."""
    marked = [m for m in dit.modules() if isinstance(m, nn.Linear) and not hasattr(m, "compute_dtype")]
    for m in marked:
        m.compute_dtype = torch.float32
    try:
        yield
    finally:
        for m in marked:
            del m.compute_dtype


def add_lora(dit: BindWeaveTransformer, cfg: TrainConfig) -> int:
    """Inject the LoRA of ``cfg.lora`` with peft; returns the number of wrapped layers."""
    from peft import LoraConfig, inject_adapter_in_model

    lc = cfg.lora
    config = LoraConfig(r=lc.rank, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                        target_modules=target_pattern(dit, lc.targets),
                        init_lora_weights=True if lc.init == "default" else lc.init)
    with _float32_adapters(dit):
        inject_adapter_in_model(config, dit, adapter_name=ADAPTER)
    wrapped = sum(1 for n, _ in dit.named_modules() if n.endswith(f".lora_A.{ADAPTER}"))
    log.info("LoRA rank %d alpha %g on %d layers (%s trainable parameters)", lc.rank, lc.alpha, wrapped,
             f"{sum(p.numel() for p in dit.parameters() if p.requires_grad):,}")
    return wrapped


def train_connector(dit: BindWeaveTransformer) -> dict[str, torch.Tensor]:
    """Make the connector trainable in float32; returns its initial values (for the exported difference)."""
    projector = getattr(dit.condition_embedder, "text_projector", None)
    if projector is None:
        raise InputError("lora.train_connector: this DiT has no connector (condition_embedder.text_projector); "
                         "only BindWeave checkpoints have one.")
    compute_dtype = dit.patch_embedding.weight.dtype
    projector.float().requires_grad_(True)
    # The DiT feeds the connector in its compute dtype and concatenates the result with the T5 states.
    projector.register_forward_pre_hook(lambda mod, args: (args[0].float(), *args[1:]))
    projector.register_forward_hook(lambda mod, args, out: out.to(compute_dtype))
    return {f"{CONNECTOR}.{n}": p.detach().float().cpu().clone() for n, p in projector.named_parameters()}


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` of the trainable parameters (peft names), as stored in checkpoints."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def export_lora(state: dict[str, torch.Tensor], alpha: float, connector_base: dict[str, torch.Tensor] | None = None,
                metadata: dict[str, str] | None = None) -> LoraWeights:
    """Our :class:`LoraWeights` from a trainable state (peft names), e.g. :func:`trainable_state`."""
    down_suffix, up_suffix = f".lora_A.{ADAPTER}.weight", f".lora_B.{ADAPTER}.weight"
    layers = {}
    for key, value in state.items():
        if key.endswith(down_suffix):
            name = key[: -len(down_suffix)]
            up = state[name + up_suffix]
            layers[name] = LoraLayer(value.detach().float().cpu().clone(), up.detach().float().cpu().clone(), alpha)
    diffs = {}
    for key, base in (connector_base or {}).items():
        diffs[key] = state[key].detach().float().cpu() - base
    return LoraWeights(layers=layers, diffs=diffs, metadata=dict(metadata or {}), source_format="bindweave")

"""Glue between the conditioning tensors and one DiT call (used by the sampler and by training)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from . import constants as C
from .contract import ConditionContract
from .dit.transformer import BindWeaveTransformer


@dataclass
class DiTBranch:
    """The conditioning of one guidance branch, batch 1 (spec sections 4, 6, 8)."""

    text_states: torch.Tensor  # [1, 512, text_dim]
    planner_states: torch.Tensor | None = None  # [1, L, planner_dim]
    clip_tokens: torch.Tensor | None = None  # [1, 1028, image_dim]
    condition: torch.Tensor | None = None  # [1, 20, 4 + T, h, w]
    reference_latents: torch.Tensor | None = None  # R-RoPE: [1, n, 16, h, w]
    contract: ConditionContract | None = None  # what the condition was made for; checked against the latent

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "DiTBranch":
        def move(t):
            return None if t is None else t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        return DiTBranch(*(move(t) for t in (self.text_states, self.planner_states, self.clip_tokens,
                                              self.condition, self.reference_latents)), contract=self.contract)

    def check(self, latent_shape: tuple[int, ...], dit_config, where: str = "") -> None:
        """Refuse a latent or DiT this branch was not made for (nothing is inferred from tensor sizes)."""
        if self.contract is None:
            return
        self.contract.check_model(dit_config)
        self.contract.check_latent(latent_shape, where)
        self.contract.check_tensors(self.condition, self.reference_latents)

    def window(self, latent_frames: int) -> "DiTBranch":
        """This branch for a context window of ``latent_frames``: the same text, planner, CLIP and reference
        tensors (never sliced), the video condition of a clip of that length, and the window's contract."""
        from .context_windows import window_condition

        slots = self.contract.slots if self.contract is not None else C.NUM_REF_SLOTS
        condition = None if self.condition is None else window_condition(self.condition, latent_frames, slots)
        contract = self.contract.for_window(latent_frames) if self.contract is not None else None
        return replace(self, condition=condition, contract=contract)


def _stack(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
    if any(t is None for t in tensors):
        return None
    return torch.cat(tensors, dim=0)


def batch_branches(branches: list[DiTBranch]) -> tuple[dict, list[int] | None]:
    """Stack branches into one DiT batch; planner states of different lengths are zero-padded at
    the end and their lengths returned, which the DiT uses to keep padding out of attention."""
    planner = [b.planner_states for b in branches]
    lengths = None
    if all(p is not None for p in planner):
        sizes = [p.shape[1] for p in planner]
        if len(set(sizes)) > 1:
            longest = max(sizes)
            planner = [torch.cat([p, p.new_zeros(1, longest - p.shape[1], p.shape[2])], dim=1) for p in planner]
            lengths = sizes
    kwargs = dict(
        encoder_hidden_states=_stack([b.text_states for b in branches]),
        encoder_hidden_states_image=_stack([b.clip_tokens for b in branches]),
        planner_states=_stack(planner),
        condition=_stack([b.condition for b in branches]),
        reference_latents=_stack([b.reference_latents for b in branches]),
    )
    return kwargs, lengths


def call_dit(dit: torch.nn.Module, x: torch.Tensor, timestep: torch.Tensor, branches: list[DiTBranch]) -> torch.Tensor:
    """The DiT on ``x`` ``[B, ...]`` (already in its dtype) with one branch per item, stacked by
    :func:`batch_branches`. Gradients flow (training calls it too); ``dit`` may be wrapped (DDP, FSDP)."""
    config = getattr(dit, "dit_config", None)  # None: a wrapped DiT (training, whose batches are its own)
    for branch in branches:
        if config is not None:
            branch.check((1, *x.shape[1:]), config)
    kwargs, lengths = batch_branches(branches)
    return dit(x, timestep, kwargs["encoder_hidden_states"], kwargs["encoder_hidden_states_image"],
               planner_states=kwargs["planner_states"], planner_lengths=lengths, condition=kwargs["condition"],
               reference_latents=kwargs["reference_latents"])


def dit_velocity(dit: BindWeaveTransformer, latents: torch.Tensor, timestep: torch.Tensor,
                 branches: list[DiTBranch]) -> torch.Tensor:
    """One DiT call over ``len(branches)`` items (latents are repeated for each branch)."""
    dtype = dit.patch_embedding.weight.dtype
    n = len(branches)
    x = latents.to(dtype).repeat(n, 1, 1, 1, 1) if n > 1 else latents.to(dtype)
    t = timestep.repeat(n) if n > 1 and timestep.shape[0] == 1 else timestep
    return call_dit(dit, x, t, branches)


def make_predictor(dit: BindWeaveTransformer, cond: DiTBranch, uncond: DiTBranch):
    """``predict(latents, timestep, "cond" | "uncond" | "both")`` for :class:`sampling.GuidanceInputs`."""
    def predict(latents: torch.Tensor, timestep: torch.Tensor, which: str) -> torch.Tensor:
        branches = {"cond": [cond], "uncond": [uncond], "both": [cond, uncond]}[which]
        with torch.no_grad():
            return dit_velocity(dit, latents, timestep, branches)

    return predict

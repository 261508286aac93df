"""Multi-GPU inference: sequence (context) parallelism and cond/uncond split.

**Context parallelism** (``enable_context_parallel``) runs on diffusers' context-parallel machinery:
its split/gather hooks (``diffusers.hooks.context_parallel.apply_context_parallel``) cut the token
sequence into one contiguous chunk per rank right after the rotary table and before block 0, and
gather the chunks again at ``proj_out``; inside, self-attention runs diffusers' Ulysses (all-to-all
of heads) or ring (KV chunks passed around, softmax merged by log-sum-exp) templates. Cross-attention
needs no communication: every rank holds the whole text/image context. Our DiT keeps the module
names of diffusers' Wan plan (``rope``, ``blocks.0``, ``proj_out``); its own plan below drops Wan's
per-token ``timestep`` split (our timestep is one value per item). The token count must divide by
the number of ranks (checked before the forward, with the fix in the message) unless
``anything=True`` (diffusers' uneven "anything" sharding).

We do the setup of diffusers' ``ModelMixin.enable_parallelism`` ourselves (mesh, ``ParallelConfig.setup``,
hooks) for one reason: it derives the device as ``rank % torch.accelerator.device_count()``, which
divides by zero on a CPU-only machine, so the gloo/CPU tests could not run the very code the GPUs
run. (On a GPU, diffusers' own ``enable_parallelism(config=..., cp_plan=...)`` works as well: our
attention processor exposes the ``_parallel_config`` it sets.)

**CFG split** (``cfg_parallel_predictor``): two ranks, rank 0 computes the conditional branch and
rank 1 the unconditional one, and they exchange the two velocities each step. Nothing in the
model changes; every rank runs the same sampler on the same (gathered) numbers.

Launch (every rank runs the whole pipeline; rank 0 writes the video)::

    torchrun --nproc-per-node 4 -m bindweave_core generate ... --parallel ulysses
    torchrun --nproc-per-node 2 -m bindweave_core generate ... --parallel cfg

**Rank groups** (``init_rank_groups``, for ``generate --batch --sp-size N``): the world is cut into
groups of N consecutive ranks, each with its own device mesh (context parallelism) or process group
(cfg split), so each group makes its own videos while its ranks share one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from diffusers.models._modeling_parallel import (
    ContextParallelConfig,
    ContextParallelInput,
    ContextParallelOutput,
    ParallelConfig,
)
from torch import nn

from ..errors import InputError

log = logging.getLogger("BindWeave")

PARALLEL_MODES = ("none", "ulysses", "ring", "cfg")

# Where the sequence is split and gathered (diffusers' ContextParallelModelPlan format). The rotary
# table (cos, sin: [1, S, 1, D/2]) is split on its output, the block input [B, S, dim] before block 0,
# and the head output [B, S, C*p] gathered after proj_out.
CP_PLAN: dict[str, Any] = {
    "rope": {
        0: ContextParallelInput(split_dim=1, expected_dims=4, split_output=True),
        1: ContextParallelInput(split_dim=1, expected_dims=4, split_output=True),
    },
    "blocks.0": {"hidden_states": ContextParallelInput(split_dim=1, expected_dims=3, split_output=False)},
    "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
}


# ---------------------------------------------------------------------------------- process group
def init_distributed() -> tuple[int, int, torch.device]:
    """Join the process group torchrun set up: ``(rank, world size, this rank's device)``.

    NCCL with one GPU per rank (``LOCAL_RANK``) when CUDA is available, else gloo on the CPU.
    Several nodes work the same way (torchrun's ``--nnodes``/``--rdzv-backend c10d`` set the variables).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2:
        raise InputError("multi-GPU generation needs several processes: launch with "
                         "`torchrun --nproc-per-node N -m bindweave_core generate ...`.")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        if local >= torch.cuda.device_count():
            raise InputError(f"rank {local} has no GPU: {torch.cuda.device_count()} visible, {world} processes "
                             "started; use --nproc-per-node <= the number of GPUs.")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    log.info("rank %d of %d on %s (%s)", dist.get_rank(), dist.get_world_size(), device, backend)
    return dist.get_rank(), dist.get_world_size(), device


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


# ---------------------------------------------------------------------------------- rank groups
@dataclass
class RankGroup:
    """This rank's share of the world when the world is cut into groups of ``size`` consecutive ranks
    (``generate --batch --sp-size``): each group makes its own videos, its ranks one video together.

    ``mesh`` is the group's device mesh for context parallelism (dims ``ring``, ``ulysses``; None
    otherwise), ``process_group`` the group's own process group (cfg split; None for a group of one)."""

    size: int
    index: int  # which group this rank is in
    count: int  # how many groups
    local_rank: int  # this rank's place inside its group (0 writes)
    mesh: Any = None
    process_group: Any = None


_GROUP: RankGroup | None = None  # set by init_rank_groups; None: one group spanning the whole world


def check_rank_groups(size: int, mode: str, world: int) -> None:
    """Whether ``world`` ranks cut into groups of ``size`` for ``mode`` (before anything starts)."""
    if size < 1 or world % size:
        raise InputError(f"--sp-size {size} must divide the number of processes ({world}): each group of {size} "
                         f"ranks makes one video at a time. Use a divisor of {world} (launch with torchrun "
                         "--nproc-per-node N for N processes).")
    if size > 1 and mode == "none":
        raise InputError(f"--sp-size {size} runs one video over {size} ranks: add --parallel ulysses or ring "
                         "(sequence split) or, for groups of 2, --parallel cfg.")
    if size == 1 and mode != "none":
        raise InputError(f"--parallel {mode} with --batch splits each video over the ranks of a group: give "
                         "--sp-size N (N ranks per video; 2 for cfg), or drop --parallel to make one video per rank.")
    if mode == "cfg" and size != 2:
        raise InputError(f"--parallel cfg splits cond and uncond over groups of exactly 2 ranks; use --sp-size 2 "
                         f"(got {size}).")


def init_rank_groups(size: int, mode: str, device: torch.device) -> RankGroup:
    """Cut the world into groups of ``size`` ranks for ``mode`` (ulysses, ring, cfg or none) and make this
    rank's group the one :func:`group_size`, :func:`enable_context_parallel` and the cfg split use.
    Every rank must call it (making groups is a collective)."""
    global _GROUP
    world, me = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    check_rank_groups(size, mode, world)
    group = RankGroup(size=size, index=me // size, count=world // size, local_rank=me % size)
    if size > 1:
        shape = {"ulysses": (1, size), "ring": (size, 1), "cfg": (1, size)}[mode]
        mesh = dist.device_mesh.init_device_mesh(device.type, (group.count, *shape),
                                                 mesh_dim_names=("group", "ring", "ulysses"))
        group.mesh = mesh["ring", "ulysses"] if mode != "cfg" else None
        group.process_group = mesh["ulysses"].get_group()
    if world > 1:  # one process alone keeps no group state (an embedding host may run more after)
        _GROUP = group
    return group


def group_size() -> int:
    """Ranks that compute one video together: this rank's group, else the whole world (1 alone)."""
    if _GROUP is not None:
        return _GROUP.size
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def current_group() -> RankGroup | None:
    return _GROUP


# ---------------------------------------------------------------------------------- context parallel
def sequence_tokens(model: nn.Module, hidden_states: torch.Tensor, condition: torch.Tensor | None = None,
                    reference_latents: torch.Tensor | None = None) -> int:
    """Tokens of the DiT's sequence for these inputs (slots and R-RoPE references included)."""
    p_t, p_h, p_w = model.config.patch_size
    _, _, frames, height, width = hidden_states.shape
    if condition is not None:
        frames = condition.shape[2]
    per_frame = (height // p_h) * (width // p_w)
    refs = reference_latents.shape[1] if reference_latents is not None else 0
    return frames // p_t * per_frame + refs * per_frame


def check_divisible(tokens: int, world: int) -> None:
    """A clear error when ``tokens`` cannot be split evenly over ``world`` ranks."""
    if tokens % world:
        raise InputError(
            f"context parallelism over {world} GPUs splits the {tokens:,} tokens of the sequence evenly, and "
            f"{tokens:,} is not divisible by {world}. Tokens = latent frames (4 slots + (frames-1)/4 + 1) x "
            f"height/16 x width/16: pick a width or height whose /16 is a multiple of {world} (832x480 and "
            f"1280x720 at 81 frames work for 2, 4 and 8 GPUs), use --parallel cfg, or a GPU count that divides it.")


def enable_context_parallel(model: nn.Module, *, ulysses_degree: int | None = None, ring_degree: int | None = None,
                            device: str | torch.device | None = None, anything: bool = False,
                            mesh: Any = None) -> ParallelConfig:
    """Shard the DiT's sequence over the ranks of the default process group, or of ``mesh`` / this rank's
    group (:func:`init_rank_groups`) (see the module docstring).

    ``ulysses_degree`` x ``ring_degree`` must equal the ranks sharing the sequence (default: all Ulysses).
    Ulysses also splits the heads: ``num_heads`` must divide by ``ulysses_degree`` unless ``anything``.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("context parallelism needs torch.distributed initialised: launch with torchrun "
                           "and call bindweave_core.dit.parallel.init_distributed() first")
    if getattr(model, "_parallel_config", None) is not None:
        raise RuntimeError("context parallelism is already enabled on this model")
    if mesh is None and _GROUP is not None and _GROUP.mesh is not None:
        mesh = _GROUP.mesh  # a rank group of generate --batch --sp-size: the sequence spans the group only
    world = mesh.size() if mesh is not None else dist.get_world_size()
    if ulysses_degree is None and ring_degree is None:
        ulysses_degree = world
    ulysses_degree, ring_degree = ulysses_degree or 1, ring_degree or 1
    if ulysses_degree * ring_degree != world:
        raise InputError(f"ulysses degree {ulysses_degree} x ring degree {ring_degree} must equal the number of "
                         f"processes ({world})")
    heads = model.config.num_attention_heads
    if ulysses_degree > 1 and heads % ulysses_degree and not anything:
        raise InputError(f"Ulysses over {ulysses_degree} GPUs splits the {heads} attention heads evenly: use a GPU "
                         f"count that divides {heads}, or ring attention (--parallel ring)")
    cp = ContextParallelConfig(ring_degree=ring_degree, ulysses_degree=ulysses_degree, mesh=mesh,
                               ulysses_anything=anything and ulysses_degree > 1,
                               ring_anything=anything and ring_degree > 1)
    device = torch.device(device) if device is not None else model.patch_embedding.weight.device
    mesh = cp.mesh or dist.device_mesh.init_device_mesh(device.type, cp.mesh_shape, mesh_dim_names=cp.mesh_dim_names)
    config = ParallelConfig(context_parallel_config=cp)
    config.setup(_GROUP.local_rank if _GROUP is not None and mesh is _GROUP.mesh else dist.get_rank(), world, device,
                 mesh=mesh)

    from diffusers.hooks.context_parallel import apply_context_parallel

    apply_context_parallel(model, cp, CP_PLAN)
    model._parallel_config = config
    model.attention_state.parallel_config = config
    model.clear_rotary_cache()  # a cached full-length table would not match the sharded tokens
    if not anything:
        def check(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            check_divisible(sequence_tokens(module, hidden, kwargs.get("condition"),
                                            kwargs.get("reference_latents")), world)

        model._cp_check_handle = model.register_forward_pre_hook(check, with_kwargs=True)
    log.info("context parallel: %d ranks (ulysses %d x ring %d) on %s", world, ulysses_degree, ring_degree,
             device.type)
    return config


# ---------------------------------------------------------------------------------- cfg split
def cfg_parallel_predictor(predict: Callable[[torch.Tensor, torch.Tensor, str], torch.Tensor],
                           group: Any = None) -> Callable[[torch.Tensor, torch.Tensor, str], torch.Tensor]:
    """Wrap a ``predict(latents, timestep, "cond" | "uncond" | "both")`` so that ``"both"`` runs the
    conditional branch on rank 0 and the unconditional one on rank 1, then gathers ``[cond, uncond]``."""
    if group is None and _GROUP is not None:
        group = _GROUP.process_group  # a rank group of generate --batch --sp-size 2
    world = dist.get_world_size(group)
    if world != 2:
        raise InputError(f"--parallel cfg splits cond and uncond over exactly 2 GPUs; {world} processes were started")
    me = dist.get_rank(group)

    def split(latents: torch.Tensor, timestep: torch.Tensor, which: str) -> torch.Tensor:
        if which != "both":
            return predict(latents, timestep, which)
        mine = predict(latents, timestep, ("cond", "uncond")[me]).contiguous()
        parts = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(parts, mine, group=group)
        return torch.cat(parts, dim=0)

    return split

"""Checkpoints that resume exactly: accelerate's ``save_state``/``load_state`` plus our hooks.

A checkpoint folder ``<output_dir>/checkpoints/step-000250`` holds, through accelerate, the
optimizer, the LR scheduler, the gradient scaler, every process's RNG states (python, numpy, torch,
CUDA) and the :class:`TrainState` (steps and the data position); our hooks replace accelerate's
whole-model file by ``trainable.safetensors`` (the LoRA and, when trained, the connector: the
frozen base is not saved again), and ``lora.safetensors`` is the LoRA exported at that step. The
data order and the per-step noise are functions of (seed, step), so nothing else is needed. The
folder is written under a temporary name and renamed when complete; older ones beyond
``train.keep_checkpoints`` are deleted.
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bindweave_core.errors import InputError

from .model import trainable_state

log = logging.getLogger("BindWeave")

TRAINABLE_FILE = "trainable.safetensors"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainState:
    """Saved with every checkpoint (``register_for_checkpointing``)."""

    step: int = 0  # optimizer steps done
    micro_step: int = 0  # micro-batches consumed by each process

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.micro_step = int(state["step"]), int(state["micro_step"])


def register_hooks(accelerator: Any, model: nn.Module) -> None:
    """Save/load only the trainable parameters of ``model`` (the unwrapped DiT) in accelerate's states."""
    from accelerate.utils import DistributedType
    from safetensors.torch import load_file, save_file

    fsdp = accelerator.distributed_type == DistributedType.FSDP  # accelerate saves sharded models itself

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        if fsdp:
            return
        if accelerator.is_main_process:
            state = {k: v.detach().cpu().contiguous() for k, v in trainable_state(model).items()}
            save_file(state, str(Path(output_dir) / TRAINABLE_FILE))
        weights.clear()  # accelerate would otherwise write the whole (frozen) model

    def load_hook(models: list, input_dir: str) -> None:
        if fsdp:
            return
        models.clear()
        path = Path(input_dir) / TRAINABLE_FILE
        if not path.exists():
            raise InputError(f"{input_dir} is not a checkpoint of this trainer: {TRAINABLE_FILE} is missing.")
        state = load_file(str(path))
        expected = set(trainable_state(model))
        if set(state) != expected:
            raise InputError(f"{path} does not match this run's LoRA (missing {sorted(expected - set(state))[:4]}, "
                             f"extra {sorted(set(state) - expected)[:4]}): resume with the config it was made with.")
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return output_dir / "checkpoints" / f"step-{step:06d}"


def list_checkpoints(output_dir: Path) -> list[Path]:
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_resume(output_dir: Path, resume: str | None) -> Path | None:
    """``latest`` -> the newest complete checkpoint (None when there is none); a path -> that folder."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            log.info("no checkpoint in %s: starting from step 0", output_dir / "checkpoints")
            return None
        return found[-1]
    path = Path(resume)
    if not path.is_dir():
        raise InputError(f"cannot resume from {path}: not a checkpoint folder (e.g. <output_dir>/checkpoints/step-000250).")
    return path


def save_checkpoint(accelerator: Any, output_dir: Path, step: int, keep: int, extra: dict[str, Any] | None = None) -> Path:
    """``accelerator.save_state`` into a temporary folder, renamed when every process is done."""
    final = checkpoint_dir(output_dir, step)
    tmp = final.with_name(f".{final.name}.tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if extra and extra.get("lora") is not None:
            from bindweave_core.lora import save_lora

            save_lora(extra["lora"], tmp / "lora.safetensors", metadata=extra.get("metadata"), dtype=extra.get("dtype"))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint saved: %s", final)
    accelerator.wait_for_everyone()
    return final

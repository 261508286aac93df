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

from bindweave_core.errors import InputError, OutputWriteError
from bindweave_core.signals import describe_os_error

from .model import trainable_state

log = logging.getLogger("BindWeave")

TRAINABLE_FILE = "trainable.safetensors"
RUN_FILE = "run.json"  # what the checkpoint was trained with (compared before resuming)
RUN_KEYS = ("base_model", "family", "rank", "alpha", "targets", "train_connector")
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
    from safetensors.torch import load_file

    from bindweave_core.checkpoints.writers import atomic_save_file

    fsdp = accelerator.distributed_type == DistributedType.FSDP  # accelerate saves sharded models itself

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        if fsdp:
            return
        if accelerator.is_main_process:
            state = {k: v.detach().cpu().contiguous() for k, v in trainable_state(model).items()}
            atomic_save_file(state, Path(output_dir) / TRAINABLE_FILE)
        weights.clear()  # accelerate would otherwise write the whole (frozen) model

    def load_hook(models: list, input_dir: str) -> None:
        if fsdp:
            return
        models.clear()
        path = Path(input_dir) / TRAINABLE_FILE
        if not path.exists():
            raise InputError(f"{input_dir} is not a checkpoint of this trainer: {TRAINABLE_FILE} is missing.")
        try:
            state = load_file(str(path))
        except Exception as e:  # safetensors raises its own error type for damaged files
            raise InputError(f"cannot resume: {path} is damaged or truncated ({e}). Resume from an earlier "
                             "checkpoint folder, or delete this one.") from e
        expected = trainable_state(model)
        if set(state) != set(expected):
            raise InputError(f"{path} does not match this run's LoRA targets (missing "
                             f"{sorted(set(expected) - set(state))[:4]}, extra {sorted(set(state) - set(expected))[:4]}): "
                             "resume with the lora.targets / lora.train_connector it was made with.")
        for name, value in state.items():
            if value.shape != expected[name].shape:
                raise InputError(f"{path}: {name} is {list(value.shape)} but this run's is "
                                 f"{list(expected[name].shape)}: the checkpoint has another lora.rank or base model.")
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
    """``accelerator.save_state`` into a temporary folder, renamed when every process is done. A write that
    fails (a full disk) or a second Ctrl-C / SIGTERM removes the temporary folder: the older checkpoints stay
    as they were, and a full disk is :class:`OutputWriteError` (one line)."""
    final = checkpoint_dir(output_dir, step)
    tmp = final.with_name(f".{final.name}.tmp")
    try:
        return _save_checkpoint(accelerator, output_dir, final, tmp, keep, extra)
    except OSError as e:
        raise OutputWriteError(describe_os_error(e, f"the checkpoint {final}") + " The previous checkpoints are "
                               "unchanged.") from None
    except RuntimeError as e:  # torch.save's zip writer reports a full disk as a RuntimeError without errno
        if not any(mark in str(e) for mark in ("inline_container", "PytorchStreamWriter", "file write failed")):
            raise
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # what it wrote is space the user gets back
        free = shutil.disk_usage(output_dir).free
        raise OutputWriteError(f"cannot write the checkpoint {final}: torch.save failed ({str(e).splitlines()[0]}) "
                               f"with {free // 1024} KiB free on that disk. Free some space or choose another "
                               "train.output_dir, then run again. The previous checkpoints are unchanged.") from None
    finally:
        if accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _save_checkpoint(accelerator: Any, output_dir: Path, final: Path, tmp: Path, keep: int,
                     extra: dict[str, Any] | None) -> Path:
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if extra and extra.get("run") is not None:
            import json

            (tmp / RUN_FILE).write_text(json.dumps(extra["run"], indent=1, sort_keys=True))
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


# ------------------------------------------------------------------------------------------ checks before resuming
def run_identity(cfg: Any, family: str) -> dict[str, Any]:
    """What a checkpoint must share with the run resuming it (stored as ``run.json``)."""
    m, lc = cfg.model, cfg.lora
    if m.smoke:
        base = f"smoke (seed {m.smoke_seed})"
    else:
        p = Path(m.dit)
        size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
        base = f"{p.name} ({size} bytes)"  # the name and size: a moved file still matches
    return {"base_model": base, "family": family, "rank": lc.rank, "alpha": lc.alpha, "targets": sorted(lc.targets),
            "train_connector": lc.train_connector}


def check_checkpoint(folder: Path, identity: dict[str, Any]) -> None:
    """Everything about a checkpoint folder that can be checked without the models: its files are
    complete and readable, and it was made with this run's base model and LoRA settings."""
    import json
    import zipfile

    from safetensors import safe_open

    def broken(name: str, why: str) -> InputError:
        return InputError(f"cannot resume from {folder}: {name} {why}. Resume from an earlier checkpoint "
                          f"({', '.join(p.name for p in list_checkpoints(folder.parent.parent)) or 'none'}) "
                          "or delete this folder.")

    run_file = folder / RUN_FILE
    if run_file.exists():
        try:
            saved = json.loads(run_file.read_text())
        except ValueError as e:
            raise broken(RUN_FILE, f"is damaged ({e})") from e
        differ = [k for k in RUN_KEYS if k in saved and saved[k] != identity[k]]
        if differ:
            detail = "; ".join(f"{k}: checkpoint {saved[k]!r}, this config {identity[k]!r}" for k in differ)
            raise InputError(f"cannot resume from {folder}: it was trained with other settings ({detail}). Resume "
                             "with the config it was made with, or start a new train.output_dir.")
    path = folder / TRAINABLE_FILE
    if not path.exists():
        raise broken(TRAINABLE_FILE, "is missing (not a checkpoint of this trainer, or an incomplete one)")
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    except Exception as e:  # safetensors' own error type for a damaged header or a short file
        raise broken(TRAINABLE_FILE, f"is damaged or truncated ({e})") from e
    ranks = {shape[0] for k, shape in shapes.items() if ".lora_A." in k}
    if ranks and ranks != {identity["rank"]}:
        raise InputError(f"cannot resume from {folder}: its LoRA has rank {sorted(ranks)}, this config "
                         f"lora.rank {identity['rank']}. Resume with the rank it was made with.")
    for name in ("optimizer.bin", "scheduler.bin"):
        file = folder / name
        if not file.exists():
            raise broken(name, "is missing")
        if not zipfile.is_zipfile(file):  # torch.save's format: a truncated file loses its central directory
            raise broken(name, "is damaged or truncated")

"""Everything about a training config that can be checked before any sample is cached or model loaded.

Config values the dataclasses cannot check alone (LoRA targets, the packages an option needs, the
output folders, the checkpoint to resume from, the launch), so a mistake costs seconds, not a
cache pass.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import uuid
from pathlib import Path

import torch

from bindweave_core.errors import InputError
from bindweave_core.preflight import check_model_paths

from .checkpointing import check_checkpoint, list_checkpoints, resolve_resume, run_identity
from .config import TrainConfig
from .model import check_targets, dit_config

log = logging.getLogger("BindWeave")

ENCODER_PATHS = ("vae", "text_encoder", "text_tokenizer", "clip_vision", "planner", "planner_tokenizer")


def _require(module: str, why: str, fix: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise InputError(f"{why} needs the {module} package, which is not installed: {fix}")


def check_packages(cfg: TrainConfig) -> None:
    t = cfg.train
    _require("peft", "the trainer", "pip install -e .[train] (or pip install peft).")
    if t.tensorboard:
        _require("tensorboard", "train.tensorboard: true", "pip install tensorboard, or set train.tensorboard: false.")
    if t.wandb:
        _require("wandb", "train.wandb: true", "pip install wandb (then wandb login), or set train.wandb: false.")
    if t.optimizer == "adamw8bit":
        _require("bitsandbytes", "train.optimizer: adamw8bit", "pip install bitsandbytes, or use optimizer: adamw.")
        if not torch.cuda.is_available():
            raise InputError("train.optimizer: adamw8bit runs on CUDA GPUs only (bitsandbytes' 8-bit optimizer); "
                             "on this machine use train.optimizer: adamw.")


def check_writable(folder: Path, what: str) -> None:
    """``folder`` can be created and written (a probe file, removed again)."""
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{what} {folder} is a file, not a folder: choose another path.")
    probe = folder / f".write-test-{uuid.uuid4().hex}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise InputError(f"{what} {folder} is not writable ({e.strerror or e}): choose a folder you can write to.") \
            from None


def check_launch(world_size: int) -> None:
    """Several processes that do not form one data-parallel run would each train alone into one folder."""
    env_world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if env_world > 1 and world_size != env_world:
        raise InputError(f"launched as {env_world} processes but they did not join one data-parallel run "
                         f"(accelerate sees {world_size}); each would train alone into the same folder. Launch "
                         "with accelerate launch --multi_gpu --num_processes N on GPUs, or torchrun "
                         "--nproc_per_node N -m training.train_lora on CPUs.")
    if world_size == 1:
        asked = _accelerate_launch_processes()
        if asked > 1:
            raise InputError(f"accelerate launch asked for {asked} processes but started one (its simple launcher "
                             "runs one process without --multi_gpu, and --cpu cannot be combined with it). On GPUs: "
                             f"accelerate launch --multi_gpu --num_processes {asked} -m training.train_lora ...; on "
                             f"CPUs: torchrun --nproc_per_node {asked} -m training.train_lora ...")


def _accelerate_launch_processes() -> int:
    """``--num_processes`` of an ``accelerate launch`` that started this process (0 when there is none)."""
    try:
        args = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return 0
    head = args[:4]  # [python,] accelerate launch ... or python -m accelerate.commands.launch ...
    if not any("accelerate" in a for a in head) or not any(a == "launch" or a.endswith(".launch") for a in head):
        return 0
    for i, a in enumerate(args):
        for flag in ("--num_processes", "--num-processes"):
            if a == flag and i + 1 < len(args) and args[i + 1].isdigit():
                return int(args[i + 1])
            if a.startswith(flag + "="):
                value = a.split("=", 1)[1]
                return int(value) if value.isdigit() else 0
    return 0


def preflight(cfg: TrainConfig, resume: str | None = None, *, main_process: bool = True) -> Path | None:
    """Every check that needs no sample and no model weights; returns the checkpoint to resume from."""
    check_packages(cfg)
    check_targets(cfg.lora.targets)
    config = dit_config(cfg)  # the file header only
    if not cfg.model.smoke:  # the encoders' files name them in the feature cache's keys
        check_model_paths({f"model.{k}": getattr(cfg.model, k) for k in ENCODER_PATHS})
    t = cfg.train
    if t.blocks_to_swap:
        if t.blocks_to_swap >= config.num_layers:
            raise InputError(f"train.blocks_to_swap {t.blocks_to_swap}: the DiT has {config.num_layers} blocks; "
                             f"swap at most {config.num_layers - 1}.")
        if not t.gradient_checkpointing:
            raise InputError("train.blocks_to_swap needs train.gradient_checkpointing: true (without it the backward "
                             "pass keeps every streamed block's weights on the GPU).")
    for i, p in enumerate(cfg.validation.prompts):
        for ref in p.get("references", []):
            if not Path(ref).is_file():
                raise InputError(f"validation.prompts[{i}]: reference image {ref} not found.")
    for ref in cfg.validation.references:
        if not Path(ref).is_file():
            raise InputError(f"validation.references: {ref} not found.")
    if main_process:
        check_writable(cfg.output_dir, "train.output_dir")
        check_writable(cfg.cache_dir, "cache.dir")
    start = resolve_resume(cfg.output_dir, resume if resume is not None else t.resume)
    if start is None and main_process and list_checkpoints(cfg.output_dir):
        log.warning("%s already holds checkpoints up to %s: this run starts again from step 0 (and replaces "
                    "loss.csv and the LoRA file); stop it and add --resume latest to continue instead",
                    cfg.output_dir, list_checkpoints(cfg.output_dir)[-1].name)
    if start is not None:
        check_checkpoint(start, run_identity(cfg, config.family))
    return start

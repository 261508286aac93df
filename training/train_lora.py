"""Train a LoRA for the BindWeave DiT.

    python -m training.train_lora --config training/configs/smoke.yaml   # CPU try-out (tiny model)
    python -m training.train_lora --config C.yaml --cache-only          # encode the dataset only
    accelerate launch --multi_gpu --num_processes 2 -m training.train_lora --config C.yaml   # several GPUs
    torchrun --nproc_per_node 2 -m training.train_lora --config C.yaml  # the same, also on CPUs (gloo)
    python -m training.train_lora --config C.yaml --resume latest       # continue exactly

Order of work: check the config (targets, packages, output folder, the checkpoint to resume) ->
check every sample (bad ones are reported in ``<output_dir>/dataset_report.json`` and left out)
-> print the memory estimate -> fill the feature cache (planner, UMT5, CLIP, VAE; then freed) -> load the DiT,
inject the LoRA with peft -> train with accelerate (mixed precision, gradient accumulation,
gradient checkpointing, DDP/FSDP) -> ``<output_dir>/<name>.safetensors``. Along the way:
``loss.csv`` (and tensorboard / wandb), ``val_loss.csv`` (held-out samples), checkpoints, preview
videos in ``samples/``. Ctrl-C (or SIGTERM, what schedulers and ``docker stop`` send) saves a checkpoint
after the current step and exits with code 130 (143 for SIGTERM); a full disk is one line, exit 1.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bindweave_core.dtypes import torch_dtype
from bindweave_core.errors import BindWeaveError, InputError, OutputWriteError
from bindweave_core.families import family_for
from bindweave_core.lora import CONFIG_KEY, save_lora
from bindweave_core.signals import EXIT_INTERRUPTED, Terminated, describe_os_error, exit_code, signal_name, terminate_as_interrupt

from .cache import FeatureCache, load_entry, load_tensors
from .checkpointing import TrainState, register_hooks, run_identity, save_checkpoint
from .config import TrainConfig
from .dataset import BadSample, BatchOrder, DatasetReport, load_dataset
from .model import add_lora, dit_config, export_lora, load_training_dit, lora_parameter_count, train_connector, trainable_state
from .objective import (
    CONDITIONING,
    conditioning_mode,
    flow_matching_loss,
    sample_sigmas,
    sigma_method,
    step_generator,
)
from .preflight import check_launch, preflight

log = logging.getLogger("BindWeave")

INTERRUPTED = EXIT_INTERRUPTED  # the shell's exit status for a process stopped by SIGINT (143: SIGTERM)
EXIT_WRITE_FAILED = 1  # an output could not be written (a full disk)
CSV_FIELDS = ("step", "loss", "lr", "grad_norm", "sigma", "seconds")


@dataclass
class RunResult:
    step: int  # optimizer steps done
    losses: list[float] = field(default_factory=list)  # this invocation's per-step losses
    lora_path: Path | None = None  # the final LoRA (None when stopped early or cache-only)
    checkpoint: Path | None = None
    report: DatasetReport | None = None
    interrupted: bool = False
    stopped_by_signal: bool = False  # Ctrl-C or SIGTERM: a checkpoint was saved, continue with --resume latest
    signal: int | None = None  # which signal stopped it (signal.SIGINT / signal.SIGTERM)
    model: torch.nn.Module | None = None  # the trained DiT (peft LoRA injected, unwrapped)
    val_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out loss)


# ------------------------------------------------------------------------------------------ logging
class LossLog:
    """``loss.csv`` (one row per optimizer step, full precision); on resume, rows after the
    checkpoint's step are dropped so the file matches an uninterrupted run."""

    def __init__(self, path: Path, resume_step: int, fields: tuple[str, ...] = CSV_FIELDS):
        self.path = path
        rows = []
        if resume_step and path.exists():
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "w", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=fields)
        self.writer.writeheader()
        self.writer.writerows(rows)
        self.file.flush()

    def write(self, **row: Any) -> None:
        self.writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def read_losses(path: Path) -> list[tuple[int, float]]:
    with open(path, newline="") as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM during training asks for a stop after the current optimizer step (with a
    checkpoint of that step); a second one stops at once. Only the main thread can own the handlers."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt
        self.requested, self.signum = True, signum
        name = signal_name(signum)
        log.warning("%s: stopping after this step with a checkpoint (%s again stops at once, losing the steps "
                    "since the last checkpoint)", name, "press Ctrl-C" if name == "Ctrl-C" else "SIGTERM")


# ------------------------------------------------------------------------------------------ helpers
def _validation_request(cfg: TrainConfig, report: DatasetReport) -> dict[str, Any] | None:
    v = cfg.validation
    if v.every <= 0:
        return None
    first = report.good[0]
    references = [str(Path(p)) for p in v.references] or [str(r.image) for r in first.references]
    width, height = v.width or first.bucket[0], v.height or first.bucket[1]
    return {"prompt": v.prompt or first.prompt, "references": references, "width": width, "height": height,
            "num_frames": v.num_frames or first.num_frames, "mask_mode": cfg.data.mask_mode}


def lora_metadata(cfg: TrainConfig, family: str, step: int) -> dict[str, str]:
    m, lc = cfg.model, cfg.lora
    return {CONFIG_KEY: cfg.to_json(), "bindweave_base_model": m.dit or f"smoke (seed {m.smoke_seed})",
            "bindweave_family": family, "bindweave_steps": str(step), "bindweave_targets": json.dumps(lc.targets),
            "bindweave_connector": "trained" if lc.train_connector else "base",
            "ss_network_dim": str(lc.rank), "ss_network_alpha": str(lc.alpha)}


def _extra_requests(cfg: TrainConfig, first: dict[str, Any] | None) -> list[dict[str, Any]]:
    """``validation.prompts``: more preview prompts at the first preview's size and length."""
    if first is None:
        return []
    return [{**first, "prompt": p["prompt"], "references": [str(Path(r)) for r in p["references"]]}
            for p in cfg.validation.prompts]


class Previewer:
    """Preview videos through the core pipeline with the training DiT (LoRA active)."""

    def __init__(self, cfg: TrainConfig, request: dict[str, Any], entry: Path, vae: Any, builder, dit_config,
                 device: torch.device, suffix: str = ""):
        from bindweave_core.pipeline import BindWeavePipeline

        t = load_tensors(entry)
        common = {"slots": t.get("slots"), "ref_latents": t.get("ref_latents"), "clip": t.get("clip"),
                  "num_references": len(request["references"])}
        self.cond = builder({**common, "text": t["cond.text"], "planner": t.get("cond.planner")},
                            t.get("video_condition"), dit_config)
        self.uncond = builder({**common, "text": t["uncond.text"], "planner": t.get("uncond.planner")},
                              t.get("video_condition"), dit_config)
        self.cfg = cfg
        self.request = request
        self.suffix = suffix  # "" for the first preview prompt, "-2", "-3", ... for validation.prompts
        self.family = dit_config.family
        self.device = device
        self.decoder = BindWeavePipeline(dit=None, vae=vae, text_encoder=None, device=device, offload="model")

    def __call__(self, dit: torch.nn.Module, step: int) -> Path:
        from bindweave_core.pipeline import BindWeavePipeline, GenerationSettings, defaults_for
        from bindweave_core.video_io import write_mp4

        v, request = self.cfg.validation, self.request
        family = defaults_for(self.family)
        settings = GenerationSettings(prompt=request["prompt"], width=request["width"], height=request["height"],
                                      num_frames=request["num_frames"], steps=v.steps, seed=v.seed,
                                      guidance=family["guidance"] if v.guidance is None else v.guidance,
                                      shift=family["shift"] if v.shift is None else v.shift,
                                      sampler=v.sampler or family["sampler"], fps=int(round(self.cfg.data.fps)))
        was_training = dit.training
        dit.eval()
        try:
            sampler = BindWeavePipeline(dit=dit, vae=None, text_encoder=None, device=self.device, offload="none")
            latents = sampler.sample(self.cond, self.uncond, settings)
            frames = self.decoder.decode(latents)
        finally:
            dit.train(was_training)
        path = write_mp4(frames, self.cfg.output_dir / "samples" / f"step-{step:06d}{self.suffix}.mp4",
                         fps=settings.fps)
        log.info("preview written: %s", path)
        return path


# ------------------------------------------------------------------------------------------ the run
def run(cfg: TrainConfig, *, cache_only: bool = False, stop_at_step: int | None = None,
        resume: str | None = None) -> RunResult:
    """Check, cache, train, export. ``stop_at_step`` saves a checkpoint at that step and returns (for
    time-limited jobs; continue with ``resume="latest"``)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    t = cfg.train
    trackers = [] if cache_only else [name for name, on in (("tensorboard", t.tensorboard), ("wandb", t.wandb)) if on]
    # torchrun on CPUs: accelerate joins the processes (gloo) only when told to use the CPU
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1) > 1
    # before accelerate starts: a missing tracker package is our clear error, not accelerate's warning
    start = preflight(cfg, resume, main_process=int(os.environ.get("RANK", "0") or 0) == 0)
    accelerator = Accelerator(
        mixed_precision=t.mixed_precision, gradient_accumulation_steps=t.gradient_accumulation_steps,
        cpu=launched and not torch.cuda.is_available(), log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(cfg.output_dir), logging_dir=str(cfg.output_dir / "logs")))
    try:
        check_launch(accelerator.num_processes)
        return _run(accelerator, cfg, cache_only, stop_at_step, start, trackers)
    finally:
        accelerator.end_training()
        _reset_accelerate(accelerator)


def _holdout(cfg: TrainConfig, samples: list[Any]) -> tuple[list[Any], list[Any]]:
    """``(training, held out)``: the last ``validation.holdout`` samples in name order are held out."""
    n = cfg.validation.holdout
    if n <= 0:
        return samples, []
    if n >= len(samples):
        raise InputError(f"validation.holdout {n}: only {len(samples)} usable samples; hold out fewer.")
    held = {s.name for s in sorted(samples, key=lambda s: s.name)[-n:]}
    return [s for s in samples if s.name not in held], [s for s in samples if s.name in held]


def _print_estimate(cfg: TrainConfig, samples: list[Any]) -> None:
    from .memory_estimate import estimate_training

    config = dit_config(cfg)
    w, h, n = max((s.group for s in samples), key=lambda g: g[0] * g[1] * g[2])
    params = lora_parameter_count(config, cfg.lora.targets, cfg.lora.rank)
    est = estimate_training(cfg, config, w, h, n, params)
    log.info("memory estimate for %dx%d, %d frames, batch %d: %s", w, h, n, cfg.train.batch_size, est.describe())


def _make_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    t = cfg.train
    kwargs = dict(lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon,
                  weight_decay=t.weight_decay)
    if t.optimizer == "adamw8bit":  # checked in preflight: bitsandbytes and CUDA present
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def _run(accelerator: Any, cfg: TrainConfig, cache_only: bool, stop_at_step: int | None, start: Path | None,
         trackers: list[str]) -> RunResult:
    """The phases of :class:`TrainingRun` in order (``cache_only``: up to the feature cache)."""
    job = TrainingRun(accelerator, cfg, stop_at_step, start, trackers)
    report = job.prepare_data()
    job.build_cache(report)
    if cache_only or not report.good:
        if not report.good:
            raise InputError("no sample could be encoded; see the reasons above.")
        return RunResult(step=0, report=report)
    job.build_model(report)
    job.prepare_optimizer()
    job.prepare_loop(report)
    try:
        job.train_loop()
        if not job.result.interrupted:
            job.export()
    finally:
        job.close()
    return job.result


class TrainingRun:
    """One training invocation in named phases: data -> feature cache -> model -> optimizer -> loop -> export.

    Each phase leaves what the next needs on ``self``; :func:`_run` calls them in order.
    """

    def __init__(self, accelerator: Any, cfg: TrainConfig, stop_at_step: int | None, start: Path | None,
                 trackers: list[str]):
        from accelerate.utils import DistributedType

        self.accelerator, self.cfg, self.stop_at_step, self.start, self.trackers = (
            accelerator, cfg, stop_at_step, start, trackers)
        self.out = cfg.output_dir
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.fsdp = accelerator.distributed_type == DistributedType.FSDP
        self.swap = None  # block swap of the DiT's frozen weights (train.blocks_to_swap)
        self.previewers: list[Previewer] = []  # validation previews (main process; none under FSDP or block swap)
        self.loss_log: LossLog | None = None
        self.val_log: LossLog | None = None
        self.progress: Any = None

    # ------------------------------------------------------------------ data and feature cache
    def prepare_data(self) -> DatasetReport:
        """Check every sample (bad ones reported and left out) and print the memory estimate."""
        accelerator, cfg, d, out = self.accelerator, self.cfg, self.cfg.data, self.out
        if cfg.train.blocks_to_swap and self.world > 1:
            raise InputError("train.blocks_to_swap is for one GPU (the DiT's blocks move between CPU and GPU, which "
                             "data-parallel training cannot follow); use it with one process, or FSDP on several GPUs.")
        if accelerator.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
        if self.world > 1:
            log.info("data-parallel run: process %d of %d (%s)", self.rank, self.world, accelerator.distributed_type)
        report = load_dataset(d.dataset_list(), d.num_frames, d.fps, d.buckets, d.mask_mode, sampling=d.frame_sampling,
                              windows=d.frame_windows, upscale=d.upscale, progress=accelerator.is_local_main_process)
        if not report.good:
            _finish_report(accelerator, report, out)
            raise InputError(f"no usable training samples in {d.path or [p for p, _ in d.dataset_list()]}: " +
                             "; ".join(f"{b.path}: {b.reason}" for b in report.bad[:5]))
        if accelerator.is_main_process:
            _print_estimate(cfg, report.good)
        return report

    def build_cache(self, report: DatasetReport) -> None:
        """Encode what the cache lacks (each process its share); samples that could not be encoded leave
        ``report.good`` for ``report.bad``."""
        accelerator, cfg, rank, world = self.accelerator, self.cfg, self.rank, self.world
        cache = self.cache = FeatureCache(cfg, progress=accelerator.is_local_main_process)
        request = self.request = _validation_request(cfg, report)
        cache.ensure(report.good, accelerator.device, rank, world, request)
        accelerator.wait_for_everyone()
        cached = self.cached = cache.collect(report.good, request)
        self.extra = _extra_requests(cfg, request)
        self.extra_entries = []
        for req in self.extra:  # more preview prompts: only their conditioning is encoded
            cache.ensure([], accelerator.device, rank, world, req)
            self.extra_entries.append(cache.collect([], req).validation)
        accelerator.wait_for_everyone()
        report.bad += cached.bad
        report.good = [s for s in report.good if s.name in cached.entries]
        _finish_report(accelerator, report, self.out)

    # ------------------------------------------------------------------ the model
    def build_model(self, report: DatasetReport) -> None:
        """The frozen DiT (block swap when asked) with the LoRA injected, in training mode."""
        from accelerate.utils import set_seed

        cfg, t = self.cfg, self.cfg.train
        dit = self.dit = load_training_dit(cfg)
        dit_config_ = self.dit_config = dit.dit_config
        mode = self.mode = conditioning_mode(cfg.objective.conditioning, dit_config_)
        self.builder = CONDITIONING[mode]
        too_many = [s for s in report.good if len(s.references) > family_for(dit_config_).max_references]
        if too_many:
            report.bad += [BadSample(s.name, f"{len(s.references)} references; a {dit_config_.family} model takes at "
                                             f"most {family_for(dit_config_).max_references}") for s in too_many]
            report.good = [s for s in report.good if s not in too_many]
            _finish_report(self.accelerator, report, self.out)
        if t.blocks_to_swap:
            # Before the LoRA goes in: only the frozen base weights stream; the adapters stay on the device.
            from bindweave_core.dit.offload import enable_block_offload

            # No prefetch: the backward pass recomputes the blocks in reverse order, where a prefetch of the
            # next block in forward order would leave an unused upload on the device for every streamed block.
            self.swap = enable_block_offload(dit, len(dit.blocks) - t.blocks_to_swap, self.accelerator.device,
                                             prefetch_blocks=0)
        set_seed(t.seed)  # here, so nothing done before (cache, other runs) changes the LoRA's start or dropout
        add_lora(dit, cfg)
        self.connector_base = train_connector(dit) if cfg.lora.train_connector else None
        if t.gradient_checkpointing:
            dit.enable_gradient_checkpointing()
        dit.train()
        self.compute_dtype = dit.patch_embedding.weight.dtype

    def prepare_optimizer(self) -> None:
        """Optimizer and LR scheduler, accelerate's wrapping, checkpoint hooks; the resumed state when resuming."""
        from diffusers.optimization import get_scheduler

        accelerator, cfg, t, world = self.accelerator, self.cfg, self.cfg.train, self.world
        params = [p for p in self.dit.parameters() if p.requires_grad]
        if self.swap is not None:
            for p in params:
                p.data = p.data.to(accelerator.device)
        optimizer = _make_optimizer(cfg, params)
        # accelerate steps the scheduler once per process per optimizer step (diffusers' convention).
        scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=t.lr_warmup_steps * world,
                                  num_training_steps=t.max_steps * world)
        placement = [self.swap is None, True, True]  # block swap placed the DiT itself
        self.model, self.optimizer, self.scheduler = accelerator.prepare(self.dit, optimizer, scheduler,
                                                                         device_placement=placement)
        self.unwrapped = accelerator.unwrap_model(self.model)
        # FSDP clips through the wrapped model
        self.clip_params = list(self.model.parameters()) if self.fsdp else params
        state = self.state = TrainState()
        accelerator.register_for_checkpointing(state)
        register_hooks(accelerator, self.unwrapped)
        start = self.start
        if start is not None:
            try:
                accelerator.load_state(str(start))
            except BindWeaveError:
                raise
            except Exception as e:  # accelerate / torch errors of a damaged optimizer, scheduler or RNG file
                raise InputError(f"cannot resume from {start}: {type(e).__name__}: {e}. The checkpoint is damaged or "
                                 "from another run; resume from an earlier one or delete it.") from e
            log.info("resumed from %s at step %d", start, state.step)
        if self.trackers:
            accelerator.init_trackers(t.wandb_project if t.wandb else "bindweave_lora", config=_flat_config(cfg))

    # ------------------------------------------------------------------ the loop
    def prepare_loop(self, report: DatasetReport) -> None:
        """Data order, held-out samples, video conditions, previewers, logs and progress bar."""
        from tqdm.auto import tqdm

        accelerator, cfg, t, rank, world = self.accelerator, self.cfg, self.cfg.train, self.rank, self.world
        samples, self.held_out = _holdout(cfg, report.good)
        self.samples = samples
        self.entries = [self.cached.entries[s.name] for s in samples]
        repeated = self.repeated = [i for i, s in enumerate(samples) for _ in range(s.repeats)]  # per-dataset repeats
        order = self.order = BatchOrder([samples[i].group for i in repeated], t.batch_size, t.seed, rank, world)
        if world > 1:
            log.info("process %d of %d: %d batches of %d per epoch", rank, world, order.per_process,
                     order.per_process * world)
            log.debug("process %d, epoch 0 samples: %s", rank,
                      json.dumps(sorted(samples[repeated[j]].name for b in order.epoch_batches(0) for j in b)))
        self.video_conditions = {g: load_tensors(p)["condition"] for g, p in self.cached.video_conditions.items()}
        self._make_previewers()
        main = accelerator.is_main_process
        self.loss_log = LossLog(self.out / "loss.csv", self.state.step) if main else None
        self.val_log = (LossLog(self.out / "val_loss.csv", self.state.step, ("step", "val_loss"))
                        if main and self.held_out else None)
        self.progress = tqdm(total=t.max_steps, initial=self.state.step, desc="training", dynamic_ncols=True,
                             disable=not accelerator.is_local_main_process)
        self.result = RunResult(step=self.state.step, report=report, model=self.unwrapped)
        self.identity = run_identity(cfg, self.dit_config.family)
        o = cfg.objective
        self.sigmas_by = sigma_method(o.sigma_sampling, self.mode)

    def _make_previewers(self) -> None:
        request = self.request
        if request is not None and self.fsdp:
            log.warning("validation previews are skipped under FSDP (the sharded DiT cannot run on one process)")
        elif request is not None and self.swap is not None:
            log.warning("validation previews are skipped with train.blocks_to_swap (the core's sampler places the DiT "
                        "itself, which would undo the swap); validation.holdout losses still run")
        elif request is not None and self.accelerator.is_main_process:
            pairs = [(request, self.cached.validation), *zip(self.extra, self.extra_entries)]
            self.previewers = [Previewer(self.cfg, req, entry, self.cache.encoders["vae"], self.builder,
                                         self.dit_config, self.accelerator.device, f"-{k + 2}" if k >= 0 else "")
                               for k, (req, entry) in enumerate(pairs, start=-1)]

    def preview(self, step: int) -> None:
        for one in self.previewers:
            one(self.unwrapped, step)

    def train_loop(self) -> None:
        """Optimizer steps up to ``train.max_steps``; a ``stop_at_step`` or Ctrl-C stops early with a checkpoint."""
        t, state, result = self.cfg.train, self.state, self.result
        self.loss_sum, self.micro, self.started = torch.zeros((), device=self.accelerator.device), 0, time.perf_counter()
        self.saved_at = -1
        stop = StopRequest()
        with stop:
            while state.step < t.max_steps:
                loss, sigmas, grad_norm = self._micro_step()
                state.micro_step += 1
                self.loss_sum += loss.detach()
                self.micro += 1
                if not self.accelerator.sync_gradients:
                    continue
                state.step += 1
                self._log_step(sigmas, grad_norm)
                stopping = self._stop_requested(stop)
                self._checkpoint_validate_preview(stopping)
                if stopping and state.step < t.max_steps:
                    result.interrupted = result.stopped_by_signal = True
                    result.signal = stop.signum or signal.SIGINT  # (another process's signal: as Ctrl-C)
                    break
                if self.stop_at_step is not None and state.step >= self.stop_at_step and state.step < t.max_steps:
                    result.interrupted = True
                    break
        result.step = state.step

    def _micro_step(self) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """One micro-batch forward and backward; the optimizer steps when accelerate says gradients sync."""
        accelerator, t, state = self.accelerator, self.cfg.train, self.state
        with accelerator.accumulate(self.model):
            batch = [self.repeated[j] for j in self.order.batch(state.micro_step)]
            gen = step_generator(t.seed, "step", state.micro_step, self.rank)
            variants = torch.randint(self.cfg.augment.variants, (len(batch),), generator=gen).tolist()
            items = [load_entry(self.entries[i], v) for i, v in zip(batch, variants)]
            noise_gen = step_generator(t.seed, "fixed-noise") if self.cfg.objective.fixed_noise else gen
            loss, sigmas = self.forward_loss(items, [self.samples[i].group for i in batch], gen, noise_gen, self.model)
            accelerator.backward(loss)
            grad_norm = None
            if accelerator.sync_gradients and t.max_grad_norm > 0:
                grad_norm = accelerator.clip_grad_norm_(self.clip_params, t.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss, sigmas, grad_norm

    def _log_step(self, sigmas: torch.Tensor, grad_norm: Any) -> None:
        """The optimizer step's loss (mean over micro-batches and processes) to loss.csv, trackers, progress."""
        step = self.state.step
        step_loss = self.accelerator.reduce(self.loss_sum / self.micro, reduction="mean").item()
        self.loss_sum.zero_()
        self.micro = 0
        self.result.losses.append(step_loss)
        lr = self.scheduler.get_last_lr()[0]
        norm = float(grad_norm) if grad_norm is not None else float("nan")
        if self.loss_log is not None:
            self.loss_log.write(step=step, loss=step_loss, lr=float(lr), grad_norm=norm,
                                sigma=float(sigmas.mean()), seconds=round(time.perf_counter() - self.started, 3))
        if self.trackers:
            self.accelerator.log({"loss": step_loss, "lr": lr, "grad_norm": norm}, step=step)
        self.progress.update(1)
        self.progress.set_postfix(loss=f"{step_loss:.4f}")

    def _stop_requested(self, stop: StopRequest) -> bool:
        stopping = stop.requested
        if self.world > 1:  # every process stops at the same step (Ctrl-C may reach only some)
            flag = torch.tensor(float(stopping), device=self.accelerator.device)
            stopping = self.accelerator.reduce(flag, reduction="sum").item() > 0
        return stopping

    def _checkpoint_validate_preview(self, stopping: bool) -> None:
        """What is due after an optimizer step: a checkpoint, a held-out loss, preview videos."""
        t, v, step = self.cfg.train, self.cfg.validation, self.state.step
        checkpoint_due = t.checkpoint_every and step % t.checkpoint_every == 0
        if checkpoint_due or step == self.stop_at_step or (stopping and step < t.max_steps):
            self.result.checkpoint = self.checkpoint()
            self.saved_at = step
        if self.held_out and ((t.checkpoint_every and step % t.checkpoint_every == 0 and not v.loss_every)
                              or (v.loss_every and step % v.loss_every == 0)):
            self.log_validation_loss()
        if self.request is not None and step % v.every == 0:
            if self.previewers:
                self.preview(step)
            self.accelerator.wait_for_everyone()  # the other processes wait for the preview

    # ------------------------------------------------------------------ losses
    def forward_loss(self, batch_items: list[dict[str, Any]], groups: list[Any], gen: torch.Generator,
                     noise_gen: torch.Generator, net: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        o, t, device = self.cfg.objective, self.cfg.train, self.accelerator.device
        latents = torch.cat([it["latents"] for it in batch_items])
        sigmas = sample_sigmas(len(batch_items), gen, o.shift, o.fixed_sigma, self.sigmas_by, latents.shape[-2:])
        noise = torch.randn(latents.shape, generator=noise_gen)
        branches = [self.builder(it, self.video_conditions.get(g), self.dit_config) for it, g in zip(batch_items, groups)]
        offload = (torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda")
                   if t.activation_offload and torch.is_grad_enabled() else contextlib.nullcontext())
        with offload:
            loss = flow_matching_loss(net, latents, branches, sigmas, noise, device=device, dtype=self.compute_dtype)
        return loss, sigmas

    def validation_loss(self) -> float:
        """Mean loss over the held-out samples: variant 0, a fixed sigma and noise per sample, no dropout."""
        unwrapped = self.unwrapped
        was_training = unwrapped.training
        unwrapped.eval()
        total = 0.0
        try:
            with torch.no_grad():
                for k, s in enumerate(self.held_out):
                    gen = step_generator(self.cfg.train.seed, "holdout", k)
                    item = load_entry(self.cached.entries[s.name], 0)
                    total += float(self.forward_loss([item], [s.group], gen, gen, unwrapped)[0])
        finally:
            unwrapped.train(was_training)
        return total / len(self.held_out)

    def log_validation_loss(self) -> None:
        step = self.state.step
        value = self.validation_loss()
        self.result.val_losses.append((step, value))
        if self.val_log is not None:
            self.val_log.write(step=step, val_loss=value)
        if self.trackers:
            self.accelerator.log({"val_loss": value}, step=step)
        log.info("step %d: held-out loss %.5f (%d samples)", step, value, len(self.held_out))

    # ------------------------------------------------------------------ checkpoints and export
    def lora_now(self) -> Any:
        """The LoRA as it is now (on the main process; every process must call it under FSDP)."""
        accelerator, model = self.accelerator, self.model
        if self.fsdp:  # gather the full parameters (a collective call)
            full = accelerator.get_state_dict(model)
            names = {n.replace("_fsdp_wrapped_module.", "") for n, p in model.named_parameters() if p.requires_grad}
            weights = {k: v for k, v in full.items() if k in names}
        else:
            weights = trainable_state(self.unwrapped)
        return export_lora(weights, self.cfg.lora.alpha, self.connector_base) if accelerator.is_main_process else None

    def checkpoint(self) -> Path:
        t, step = self.cfg.train, self.state.step
        lora = self.lora_now()
        return save_checkpoint(self.accelerator, self.out, step, t.keep_checkpoints,
                               {"lora": lora, "metadata": lora_metadata(self.cfg, self.dit_config.family, step),
                                "dtype": torch_dtype(t.save_dtype), "run": self.identity})

    def export(self) -> None:
        """After the last step: a final checkpoint, held-out loss and preview where not done yet, the LoRA file."""
        accelerator, cfg, t, step, result = self.accelerator, self.cfg, self.cfg.train, self.state.step, self.result
        if self.saved_at != step:
            result.checkpoint = self.checkpoint()
        if self.held_out and (not result.val_losses or result.val_losses[-1][0] != step):
            self.log_validation_loss()
        if self.previewers and step % cfg.validation.every:
            self.preview(step)
        lora = self.lora_now()
        if accelerator.is_main_process:
            path = self.out / f"{t.name}.safetensors"
            try:  # atomic: a failed write leaves no partial file (the checkpoint above holds the same LoRA)
                result.lora_path = save_lora(lora, path, metadata=lora_metadata(cfg, self.dit_config.family, step),
                                             dtype=torch_dtype(t.save_dtype))
            except OSError as e:
                raise OutputWriteError(describe_os_error(e, f"the LoRA {path}") + f" The checkpoint {result.checkpoint}"
                                       " holds it too (lora.safetensors).") from None
            log.info("LoRA saved: %s (%d layers, step %d)", result.lora_path, len(lora.layers), step)
        accelerator.wait_for_everyone()

    def close(self) -> None:
        """Close the progress bar and logs; take the DiT's blocks off the swap."""
        if self.progress is not None:
            self.progress.close()
        for f in (self.loss_log, self.val_log):
            if f is not None:
                f.close()
        if self.swap is not None:
            from bindweave_core.dit.offload import disable_block_offload

            disable_block_offload(self.unwrapped)


def _flat_config(cfg: TrainConfig) -> dict[str, Any]:
    """``section.key: value`` with lists as strings (what the trackers' hyperparameter tables take)."""
    return {f"{sec}.{k}": (v if isinstance(v, (int, float, str, bool)) or v is None else json.dumps(v))
            for sec, values in cfg.to_dict().items() for k, v in values.items()}


def _finish_report(accelerator: Any, report: DatasetReport, out: Path) -> None:
    if accelerator.is_main_process:
        report.log()
        report.write(out / "dataset_report.json")


def _reset_accelerate(accelerator: Any) -> None:
    """Let a later run in the same process build its own Accelerator (tests, notebooks)."""
    from accelerate.state import AcceleratorState, GradientState

    if accelerator.num_processes == 1:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


# ------------------------------------------------------------------------------------------ CLI
def _stopped(signum_or_error: int | BaseException) -> str:
    """"interrupted" (Ctrl-C) or "terminated (SIGTERM)", the first word of the last line."""
    return "interrupted" if signal_name(signum_or_error) == "Ctrl-C" else "terminated (SIGTERM)"


def build_parser() -> argparse.ArgumentParser:
    from bindweave_core.cli import OneLineErrorParser  # a bad command line: one line, not the usage block

    p = OneLineErrorParser(prog="python -m training.train_lora", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="the training YAML (see training/configs/example.yaml)")
    p.add_argument("--cache-only", action="store_true", help="check the data and fill the feature cache, then stop")
    p.add_argument("--resume", help="'latest' or a checkpoint folder (overrides train.resume)")
    p.add_argument("--stop-at-step", type=int, help="save a checkpoint at this step and exit (continue with --resume)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (YAML syntax), e.g. --set train.max_steps=500")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level), format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("accelerate").setLevel(max(logging.WARNING, getattr(logging, args.log_level)))
    try:
        with terminate_as_interrupt():  # SIGTERM before or after the training loop: as Ctrl-C
            cfg = TrainConfig.from_yaml(args.config, args.overrides)
            result = run(cfg, cache_only=args.cache_only, stop_at_step=args.stop_at_step, resume=args.resume)
    except BindWeaveError as e:
        log.error("%s", e)
        return EXIT_WRITE_FAILED if isinstance(e, OutputWriteError) else 2
    except OSError as e:  # a full disk while writing logs, the cache or previews: one line, not a traceback
        log.error("%s", describe_os_error(e, "the training outputs"))
        return EXIT_WRITE_FAILED
    except KeyboardInterrupt as e:  # before training (the cache keeps what it finished) or a second signal
        log.error("%s: the feature cache keeps every finished entry; the last checkpoint is where "
                  "--resume latest continues", _stopped(e))
        return exit_code(e)
    if result.stopped_by_signal:
        log.error("%s at step %d: checkpoint %s saved; continue with --resume latest", _stopped(result.signal),
                  result.step, result.checkpoint)
        return exit_code(result.signal)
    if result.lora_path is not None:
        log.info("done: %s", result.lora_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Train a LoRA for the BindWeave DiT.

    python -m training.train_lora --config training/configs/example.yaml
    python -m training.train_lora --config C.yaml --cache-only          # encode the dataset only
    accelerate launch -m training.train_lora --config C.yaml            # several GPUs / machines
    python -m training.train_lora --config C.yaml --resume latest       # continue exactly

Order of work: check every sample (bad ones are reported in ``<output_dir>/dataset_report.json``
and left out) -> fill the feature cache (planner, UMT5, CLIP, VAE; then freed) -> load the DiT,
inject the LoRA with peft -> train with accelerate (mixed precision, gradient accumulation,
gradient checkpointing, DDP/FSDP) -> ``<output_dir>/<name>.safetensors``. Along the way:
``loss.csv`` (and tensorboard), checkpoints, preview videos in ``samples/``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bindweave_core.errors import BindWeaveError, InputError
from bindweave_core.lora import CONFIG_KEY, save_lora

from .cache import FeatureCache, load_entry, load_tensors
from .checkpointing import TrainState, register_hooks, resolve_resume, save_checkpoint
from .config import TrainConfig, torch_dtype
from .dataset import BadSample, BatchOrder, DatasetReport, load_dataset
from .model import add_lora, export_lora, load_training_dit, train_connector, trainable_state
from .objective import (
    CONDITIONING,
    conditioning_mode,
    flow_matching_loss,
    sample_sigmas,
    sigma_method,
    step_generator,
)

log = logging.getLogger("BindWeave")

CSV_FIELDS = ("step", "loss", "lr", "grad_norm", "sigma", "seconds")


@dataclass
class RunResult:
    step: int  # optimizer steps done
    losses: list[float] = field(default_factory=list)  # this invocation's per-step losses
    lora_path: Path | None = None  # the final LoRA (None when stopped early or cache-only)
    checkpoint: Path | None = None
    report: DatasetReport | None = None
    interrupted: bool = False
    model: torch.nn.Module | None = None  # the trained DiT (peft LoRA injected, unwrapped)


# ------------------------------------------------------------------------------------------ logging
class LossLog:
    """``loss.csv`` (one row per optimizer step, full precision); on resume, rows after the
    checkpoint's step are dropped so the file matches an uninterrupted run."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        rows = []
        if resume_step and path.exists():
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "w", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=CSV_FIELDS)
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


# ------------------------------------------------------------------------------------------ helpers
def _validation_request(cfg: TrainConfig, report: DatasetReport) -> dict[str, Any] | None:
    v = cfg.validation
    if v.every <= 0:
        return None
    first = report.good[0]
    references = [str(Path(p)) for p in v.references] or [str(r.image) for r in first.references]
    width, height = v.width or first.bucket[0], v.height or first.bucket[1]
    return {"prompt": v.prompt or first.prompt, "references": references, "width": width, "height": height,
            "num_frames": v.num_frames or cfg.data.num_frames, "mask_mode": cfg.data.mask_mode}


def lora_metadata(cfg: TrainConfig, family: str, step: int) -> dict[str, str]:
    m, lc = cfg.model, cfg.lora
    return {CONFIG_KEY: cfg.to_json(), "bindweave_base_model": m.dit or f"smoke (seed {m.smoke_seed})",
            "bindweave_family": family, "bindweave_steps": str(step), "bindweave_targets": json.dumps(lc.targets),
            "bindweave_connector": "trained" if lc.train_connector else "base",
            "ss_network_dim": str(lc.rank), "ss_network_alpha": str(lc.alpha)}


class Previewer:
    """Preview videos through the core pipeline with the training DiT (LoRA active)."""

    def __init__(self, cfg: TrainConfig, request: dict[str, Any], entry: Path, vae: Any, builder, dit_config,
                 device: torch.device):
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
        path = write_mp4(frames, self.cfg.output_dir / "samples" / f"step-{step:06d}.mp4", fps=settings.fps)
        log.info("preview written: %s", path)
        return path


# ------------------------------------------------------------------------------------------ the run
def run(cfg: TrainConfig, *, cache_only: bool = False, stop_at_step: int | None = None,
        resume: str | None = None) -> RunResult:
    """Cache, train, export. ``stop_at_step`` saves a checkpoint at that step and returns (for
    time-limited jobs; continue with ``resume="latest"``)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    t = cfg.train
    tensorboard = t.tensorboard and not cache_only and _has_tensorboard()
    accelerator = Accelerator(
        mixed_precision=t.mixed_precision, gradient_accumulation_steps=t.gradient_accumulation_steps,
        log_with="tensorboard" if tensorboard else None,
        project_config=ProjectConfiguration(project_dir=str(cfg.output_dir), logging_dir=str(cfg.output_dir / "logs")))
    try:
        return _run(accelerator, cfg, cache_only, stop_at_step, resume, tensorboard)
    finally:
        accelerator.end_training()
        _reset_accelerate(accelerator)


def _run(accelerator: Any, cfg: TrainConfig, cache_only: bool, stop_at_step: int | None, resume: str | None,
         tensorboard: bool) -> RunResult:
    from accelerate.utils import DistributedType, set_seed
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    t = cfg.train
    out = cfg.output_dir
    rank, world = accelerator.process_index, accelerator.num_processes
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)

    # -- data
    report = load_dataset(cfg.data.path, cfg.data.num_frames, cfg.data.fps, cfg.data.buckets, cfg.data.mask_mode)
    if not report.good:
        _finish_report(accelerator, report, out)
        raise InputError(f"no usable training samples in {cfg.data.path}: " +
                         "; ".join(f"{b.path}: {b.reason}" for b in report.bad[:5]))

    # -- feature cache (each process encodes its share)
    cache = FeatureCache(cfg)
    request = _validation_request(cfg, report)
    cache.ensure(report.good, accelerator.device, rank, world, request)
    accelerator.wait_for_everyone()
    cached = cache.collect(report.good, request)
    report.bad += cached.bad
    report.good = [s for s in report.good if s.name in cached.entries]
    _finish_report(accelerator, report, out)
    if cache_only or not report.good:
        if not report.good:
            raise InputError("no sample could be encoded; see the reasons above.")
        return RunResult(step=0, report=report)

    # -- model
    dit = load_training_dit(cfg)
    dit_config = dit.dit_config
    mode = conditioning_mode(cfg.objective.conditioning, dit_config)
    builder = CONDITIONING[mode]
    too_many = [s for s in report.good if len(s.references) > dit_config.max_references]
    if too_many:
        report.bad += [BadSample(s.name, f"{len(s.references)} references; a {dit_config.family} model takes at most "
                                         f"{dit_config.max_references}") for s in too_many]
        report.good = [s for s in report.good if s not in too_many]
        _finish_report(accelerator, report, out)
    set_seed(t.seed)  # here, so nothing done before (cache, other runs) changes the LoRA's start or dropout
    add_lora(dit, cfg)
    connector_base = train_connector(dit) if cfg.lora.train_connector else None
    if t.gradient_checkpointing:
        dit.enable_gradient_checkpointing()
    dit.train()
    compute_dtype = dit.patch_embedding.weight.dtype
    params = [p for p in dit.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                                  eps=t.adam_epsilon, weight_decay=t.weight_decay)
    # accelerate steps the scheduler once per process per optimizer step (diffusers' convention).
    scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=t.lr_warmup_steps * world,
                              num_training_steps=t.max_steps * world)
    model, optimizer, scheduler = accelerator.prepare(dit, optimizer, scheduler)
    unwrapped = accelerator.unwrap_model(model)
    clip_params = list(model.parameters()) if fsdp else params  # FSDP clips through the wrapped model
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    register_hooks(accelerator, unwrapped)
    start = resolve_resume(out, resume if resume is not None else t.resume)
    if start is not None:
        accelerator.load_state(str(start))
        log.info("resumed from %s at step %d", start, state.step)
    if tensorboard:
        accelerator.init_trackers("bindweave_lora")

    # -- data order, conditions, logs
    samples = report.good
    entries = [cached.entries[s.name] for s in samples]
    order = BatchOrder([s.bucket for s in samples], t.batch_size, t.seed, rank, world)
    video_conditions = {b: load_tensors(p)["condition"] for b, p in cached.video_conditions.items()}
    previewer = None
    if request is not None and fsdp:
        log.warning("validation previews are skipped under FSDP (the sharded DiT cannot run on one process)")
    elif request is not None and accelerator.is_main_process:
        previewer = Previewer(cfg, request, cached.validation, cache.encoders["vae"], builder, dit_config,
                              accelerator.device)
    loss_log = LossLog(out / "loss.csv", state.step) if accelerator.is_main_process else None
    progress = tqdm(total=t.max_steps, initial=state.step, desc="training", dynamic_ncols=True,
                    disable=not accelerator.is_local_main_process)
    result = RunResult(step=state.step, report=report, model=unwrapped)

    def lora_now() -> Any:
        """The LoRA as it is now (on the main process; every process must call it under FSDP)."""
        if fsdp:  # gather the full parameters (a collective call)
            full = accelerator.get_state_dict(model)
            names = {n.replace("_fsdp_wrapped_module.", "") for n, p in model.named_parameters() if p.requires_grad}
            weights = {k: v for k, v in full.items() if k in names}
        else:
            weights = trainable_state(unwrapped)
        return export_lora(weights, cfg.lora.alpha, connector_base) if accelerator.is_main_process else None

    def checkpoint() -> Path:
        lora = lora_now()
        return save_checkpoint(accelerator, out, state.step, t.keep_checkpoints,
                               {"lora": lora, "metadata": lora_metadata(cfg, dit_config.family, state.step),
                                "dtype": torch_dtype(t.save_dtype)})

    o = cfg.objective
    sigmas_by = sigma_method(o.sigma_sampling, mode)
    loss_sum, micro, started = torch.zeros((), device=accelerator.device), 0, time.perf_counter()
    saved_at = -1
    try:
        while state.step < t.max_steps:
            with accelerator.accumulate(model):
                batch = order.batch(state.micro_step)
                gen = step_generator(t.seed, "step", state.micro_step, rank)
                variants = torch.randint(cfg.augment.variants, (len(batch),), generator=gen).tolist()
                items = [load_entry(entries[i], v) for i, v in zip(batch, variants)]
                latents = torch.cat([it["latents"] for it in items])
                sigmas = sample_sigmas(len(items), gen, o.shift, o.fixed_sigma, sigmas_by, latents.shape[-2:])
                noise_gen = step_generator(t.seed, "fixed-noise") if o.fixed_noise else gen
                noise = torch.randn(latents.shape, generator=noise_gen)
                branches = [builder(it, video_conditions.get(samples[i].bucket), dit_config) for i, it in zip(batch, items)]
                loss = flow_matching_loss(model, latents, branches, sigmas, noise, device=accelerator.device,
                                          dtype=compute_dtype)
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients and t.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(clip_params, t.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            state.micro_step += 1
            loss_sum += loss.detach()
            micro += 1
            if not accelerator.sync_gradients:
                continue
            state.step += 1
            step_loss = accelerator.reduce(loss_sum / micro, reduction="mean").item()
            loss_sum.zero_()
            micro = 0
            result.losses.append(step_loss)
            lr = scheduler.get_last_lr()[0]
            norm = float(grad_norm) if grad_norm is not None else float("nan")
            if loss_log is not None:
                loss_log.write(step=state.step, loss=step_loss, lr=float(lr), grad_norm=norm,
                               sigma=float(sigmas.mean()), seconds=round(time.perf_counter() - started, 3))
            if tensorboard:
                accelerator.log({"loss": step_loss, "lr": lr, "grad_norm": norm}, step=state.step)
            progress.update(1)
            progress.set_postfix(loss=f"{step_loss:.4f}")
            if (t.checkpoint_every and state.step % t.checkpoint_every == 0) or state.step == stop_at_step:
                result.checkpoint = checkpoint()
                saved_at = state.step
            if request is not None and state.step % cfg.validation.every == 0:
                if previewer is not None:
                    previewer(unwrapped, state.step)
                accelerator.wait_for_everyone()  # the other processes wait for the preview
            if stop_at_step is not None and state.step >= stop_at_step and state.step < t.max_steps:
                result.interrupted = True
                break
        result.step = state.step
        if not result.interrupted:
            if saved_at != state.step:
                result.checkpoint = checkpoint()
            if previewer is not None and state.step % cfg.validation.every:
                previewer(unwrapped, state.step)
            lora = lora_now()
            if accelerator.is_main_process:
                result.lora_path = save_lora(lora, out / f"{t.name}.safetensors",
                                             metadata=lora_metadata(cfg, dit_config.family, state.step),
                                             dtype=torch_dtype(t.save_dtype))
                log.info("LoRA saved: %s (%d layers, step %d)", result.lora_path, len(lora.layers), state.step)
            accelerator.wait_for_everyone()
    finally:
        progress.close()
        if loss_log is not None:
            loss_log.close()
    return result


def _finish_report(accelerator: Any, report: DatasetReport, out: Path) -> None:
    if accelerator.is_main_process:
        report.log()
        report.write(out / "dataset_report.json")


def _has_tensorboard() -> bool:
    from accelerate.utils import is_tensorboard_available

    return bool(is_tensorboard_available())


def _reset_accelerate(accelerator: Any) -> None:
    """Let a later run in the same process build its own Accelerator (tests, notebooks)."""
    from accelerate.state import AcceleratorState, GradientState

    if accelerator.num_processes == 1:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


# ------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.train_lora", description=__doc__.split("\n\n")[0])
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
        cfg = TrainConfig.from_yaml(args.config, args.overrides)
        result = run(cfg, cache_only=args.cache_only, stop_at_step=args.stop_at_step, resume=args.resume)
    except BindWeaveError as e:
        log.error("%s", e)
        return 2
    if result.lora_path is not None:
        log.info("done: %s", result.lora_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

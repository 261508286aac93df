"""``python -m bindweave_core generate``: prompt + reference images -> MP4 (+ a JSON sidecar)."""

from __future__ import annotations

import argparse
import hashlib
import logging
import platform
from pathlib import Path
from typing import Any

# Nothing here imports torch at module level: `generate --help` must print at once (torch alone takes
# seconds to import). Models, torch and diffusers are imported when a run needs them.
from . import __version__
from . import constants as C
from .dtypes import torch_dtype
from .errors import GenerationCancelled, InputError
from .runtime import add_runtime_arguments, runtime_from_args
from .setting_bounds import range_text
from .signals import exit_code, signal_name
from .smoke import SMOKE_DEFAULTS, SMOKE_FAMILIES

log = logging.getLogger("BindWeave")

MODEL_ARGS = ("dit", "vae", "text_encoder", "clip_vision", "planner")
PATH_ARGS = MODEL_ARGS + ("planner_tokenizer", "text_tokenizer", "kaleido_dir")
HASH_LIMIT = 1 << 30  # hash files up to 1 GB; record size and mtime of bigger ones
DTYPES = C.DTYPE_NAMES


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends "(default: ...)" to options with a default that their help does not already state."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (action.option_strings and default is not None and default is not False
                and default != argparse.SUPPRESS and "default" not in text):
            text += (" " if text else "") + "(default: %(default)s)"
        return text


def _family_defaults(bindweave: Any, kaleido: Any, smoke: Any = None) -> str:
    """"default X (Kaleido Y; smoke model Z)": the official value of each family and the smoke model's."""
    smoke_part = f"; smoke model {smoke}" if smoke is not None else ""
    return f"default {bindweave} (Kaleido {kaleido}{smoke_part})"


def add_generate_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("generate", help="generate a video from a prompt and 1-4 reference images",
                       formatter_class=DefaultsHelpFormatter,
                       description="Generate a video. With no model files given (or --smoke) the built-in tiny "
                                   "smoke model runs on the CPU: the pipeline works end to end, the video is noise. "
                                   "Settings left out take the model family's official values (BindWeave or "
                                   "Kaleido).")
    p.add_argument("--ref", action="append", metavar="IMG",
                   help="reference image (repeat; BindWeave 1-4, Kaleido 1-3); required without --batch")
    p.add_argument("--mask", action="append", metavar="IMG",
                   help="optional subject mask per reference (same order; non-default, see README)")
    p.add_argument("--mask-mode", choices=C.MASK_MODES, default="rectangle",
                   help="rectangle = official letterbox mask; alpha = use the alpha channel of RGBA cut-outs")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="what the video shows (this or --prompt-file: required without --batch)")
    prompt.add_argument("--prompt-file", help="read the prompt from this text file")
    p.add_argument("--negative-prompt", help="default: the model family's official negative prompt (see "
                                             "bindweave_core/constants.py)")
    p.add_argument("--out", help="output .mp4 (a .json sidecar is written beside it); required without --batch")
    _add_model_arguments(p)
    _add_generation_arguments(p)
    _add_runtime_group(p)
    p.set_defaults(func=run_generate)
    return p


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    models = p.add_argument_group("models (files or Hugging Face directories)")
    models.add_argument("--dit", help="BindWeave DiT: diffusers dir or single .safetensors")
    models.add_argument("--vae", help="Wan 2.1 VAE")
    models.add_argument("--text-encoder", help="UMT5-XXL encoder")
    models.add_argument("--clip-vision", help="CLIP ViT-H/14 vision encoder")
    models.add_argument("--planner", help="Qwen2.5-VL-7B (directory or ComfyUI single file)")
    models.add_argument("--planner-tokenizer", help="Qwen2.5 tokenizer folder (for single-file planners)")
    models.add_argument("--text-tokenizer", help="UMT5 tokenizer folder (if the text encoder file has none)")
    models.add_argument("--kaleido-dir", metavar="DIR",
                        help="the Kaleido-14B-S2V download (model/, Wan2.1_VAE.pth, umt5-xxl/): sets the DiT, VAE, "
                             "text encoder and tokenizer not given separately")
    models.add_argument("--smoke", action="store_true", help="use the built-in tiny random models")
    models.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                        help="apply a LoRA to the DiT (repeat for several; strength default 1.0)")
    models.add_argument("--family", choices=SMOKE_FAMILIES,
                        help="model family: picks the smoke model (default bindweave); with model files it "
                             "overrides the family read from the DiT checkpoint (default: the checkpoint's)")


def _add_generation_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation (defaults: the model family's official values; the smoke model's own "
                             "are small enough for a CPU)")
    sd = SMOKE_DEFAULTS
    g.add_argument("--width", type=int, help=_family_defaults(C.DEFAULT_WIDTH, C.KALEIDO_WIDTH, sd["width"])
                   + f"; a multiple of {C.SIZE_MULTIPLE}")
    g.add_argument("--height", type=int, help=_family_defaults(C.DEFAULT_HEIGHT, C.KALEIDO_HEIGHT,
                                                               sd["height"]) + f"; a multiple of {C.SIZE_MULTIPLE}")
    g.add_argument("--frames", type=int, help="4k+1 frames; " + _family_defaults(C.DEFAULT_FRAMES,
                                                                                  C.KALEIDO_FRAMES, sd["num_frames"]))
    g.add_argument("--steps", type=int, help=_family_defaults(C.DEFAULT_STEPS, C.KALEIDO_STEPS, sd["steps"]))
    g.add_argument("--guidance", type=float, help=_family_defaults(C.DEFAULT_GUIDANCE, C.KALEIDO_GUIDANCE)
                   + f"; {range_text('guidance')}, 1 = no guidance")
    g.add_argument("--shift", type=float, help=_family_defaults(C.DEFAULT_SHIFT, C.KALEIDO_SHIFT)
                   + f"; {range_text('shift')}")
    g.add_argument("--sampler", choices=C.SAMPLERS, help=_family_defaults(C.DEFAULT_SAMPLER, C.KALEIDO_SAMPLER))
    g.add_argument("--seed", type=int, default=C.DEFAULT_SEED,
                   help=f"noise seed, 0 to 2**64-1 (default {C.DEFAULT_SEED}, the official one)")
    g.add_argument("--fps", type=int, help=_family_defaults(C.DEFAULT_FPS, C.KALEIDO_FPS)
                   + f"; {range_text('fps')}")
    g.add_argument("--refine-prompt", action="store_true", help="let the planner rewrite the prompt first")
    g.add_argument("--refine-seed", type=int, help="sample the rewrite with this seed (default: greedy)")
    g.add_argument("--cfg-batch", choices=C.CFG_BATCH_MODES, default="auto",
                   help="run cond and uncond as one batch or one after the other; auto: batched when it fits")
    g.add_argument("--clip-antialias", action="store_true",
                   help="antialias the CLIP 224 resize (torchvision >= 0.17); default none, as the official run")
    w = p.add_argument_group("context windows (long videos: overlapping clips of the trained length, fused per "
                             "step; frames counted as ComfyUI's Wan context node counts them)")
    w.add_argument("--context-frames", type=int, default=0, metavar="N",
                   help="window length in video frames, 4k+1 (e.g. 81); default 0: off, the whole video is one clip")
    w.add_argument("--context-overlap", type=int, default=C.DEFAULT_CONTEXT_OVERLAP, metavar="M",
                   help=f"frames shared by neighbouring windows, a multiple of 4 (default {C.DEFAULT_CONTEXT_OVERLAP})")
    w.add_argument("--context-schedule", choices=C.CONTEXT_SCHEDULES, default=C.DEFAULT_CONTEXT_SCHEDULE,
                   help=f"window placement (ComfyUI's names; default {C.DEFAULT_CONTEXT_SCHEDULE})")
    w.add_argument("--context-fuse", choices=C.CONTEXT_FUSE_METHODS, default=C.DEFAULT_CONTEXT_FUSE,
                   help=f"how overlapping windows are weighted (default {C.DEFAULT_CONTEXT_FUSE})")
    g.add_argument("--step-cache", type=float, nargs="?", const=C.DEFAULT_STEP_CACHE, default=0.0, metavar="THRESHOLD",
                   help=f"skip DiT evaluations while the output barely changes (EasyCache; approximate). Alone: the "
                        f"authors' Wan 2.1 threshold {C.DEFAULT_STEP_CACHE}; higher skips more. Default 0: off")
    g.add_argument("--evaluate", action="store_true",
                   help="score the video against the references (CLIP-I, subject consistency, flickering, motion; "
                        "see docs/evaluation.md) into the sidecar's 'evaluation' field, with the run's CLIP vision "
                        "model (--clip-vision for Kaleido)")


def _add_runtime_group(p: argparse.ArgumentParser) -> None:
    r = p.add_argument_group("runtime")
    r.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if available)")
    r.add_argument("--dtype", choices=DTYPES, help="default: bf16 on CUDA, fp32 on CPU")
    r.add_argument("--weight-format", choices=C.DIT_WEIGHT_FORMATS, default="default",
                   help="fp8: keep the DiT's block weights in fp8 storage; fp8_fast: also multiply in fp8 on GPUs "
                        "with compute capability >= 8.9 (changes the numbers slightly)")
    r.add_argument("--attention", choices=C.ATTENTION_BACKENDS, default="sdpa",
                   help="sdpa (default): PyTorch's fused kernels; sage/flash need their packages and a CUDA GPU; "
                        "auto: sage, else flash, else sdpa")
    r.add_argument("--offload", choices=C.OFFLOAD_MODES,
                   help="release (default): load each model when needed and free it after (least memory); with "
                        "--batch the default is model (each model loads once and waits in CPU memory)")
    r.add_argument("--condition-cache", metavar="DIR",
                   help="directory keeping the video condition, text, planner and reference states across runs "
                        "(reused while the models and inputs are unchanged; exact); default: none (memory only)")
    r.add_argument("--planner-cache", metavar="DIR", help="the same as --condition-cache (older name); default none")
    add_runtime_arguments(r)


def file_fingerprint(path: str) -> dict[str, Any]:
    """Size (and sha256 for files up to 1 GB) of a model file or directory."""
    p = Path(path)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    info: dict[str, Any] = {"path": str(p), "bytes": sum(f.stat().st_size for f in files)}
    if not p.is_dir() and info["bytes"] <= HASH_LIMIT:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        info["sha256"] = h.hexdigest()
    else:
        info["mtime"] = max(f.stat().st_mtime for f in files)
    return info


def check_option_conflicts(args: argparse.Namespace) -> None:
    """Options that contradict each other are refused rather than one of them ignored."""
    files = [f"--{name.replace('_', '-')}" for name in PATH_ARGS if getattr(args, name, None)]
    if args.smoke and files:
        raise InputError(f"--smoke runs the built-in tiny random model and would ignore {', '.join(files)}: remove "
                         "--smoke to run those model files, or remove the model files for a smoke run.")
    if args.condition_cache and args.planner_cache:
        raise InputError("--condition-cache and --planner-cache are two names of the same option (a folder for "
                         f"the condition cache); give only one (got {args.condition_cache} and {args.planner_cache}).")


def resolve_model_args(args: argparse.Namespace) -> tuple[bool, str]:
    """Fill the model paths (and the family, unless given) a ``--kaleido-dir`` bundle provides; ``(smoke,
    family)`` without loading a model (the family of a DiT file is read from its header)."""
    if args.kaleido_dir and not args.smoke:
        from .kaleido import find_kaleido_bundle

        bundle = find_kaleido_bundle(args.kaleido_dir)
        for name in ("dit", "vae", "text_encoder", "text_tokenizer"):
            if not getattr(args, name):
                setattr(args, name, str(getattr(bundle, name)))
        args.family = args.family or bundle.family
    family = args.family
    smoke = args.smoke or not any(getattr(args, name) for name in MODEL_ARGS)
    if smoke:
        return True, family or "bindweave"
    return False, _dit_family(args.dit, family) if args.dit else family or "bindweave"


def build_pipeline(args: argparse.Namespace):
    """``(pipeline, model info for the sidecar)``; call :func:`resolve_model_args` first."""
    from .pipeline import BindWeavePipeline

    family = args.family  # the user's, else the --kaleido-dir bundle's (resolve_model_args), else the DiT's
    given = {name: getattr(args, name) for name in MODEL_ARGS}
    runtime, device = runtime_from_args(args)
    if args.smoke or not any(given.values()):
        if not args.smoke:
            log.warning("no model files given: running the built-in tiny smoke model (the video will be noise)")
        return (BindWeavePipeline.smoke(seed=args.seed, device=device or "cpu", family=family or "bindweave",
                                        runtime=runtime), {"smoke": True})
    needed = ("dit", "vae", "text_encoder")  # a DiT's family says what else it needs (Kaleido: nothing)
    if given["dit"]:
        from .families import family_for

        encoders = family_for(_dit_family(given["dit"], family)).encoders
        needed += tuple(n for n in ("clip_vision", "planner") if n in encoders)
    missing = [f"--{n.replace('_', '-')}" for n in needed if not given[n]]
    if missing:
        raise InputError(f"missing model files: {', '.join(missing)} (or use --smoke for the tiny test model).")
    from .condition_cache import ConditionCache

    cache_dir = args.condition_cache or args.planner_cache
    pipe = BindWeavePipeline.from_files(
        dit=args.dit, vae=args.vae, text_encoder=args.text_encoder, clip_vision=args.clip_vision,
        planner=args.planner, planner_tokenizer=args.planner_tokenizer, text_tokenizer=args.text_tokenizer,
        dtype=torch_dtype(args.dtype) if args.dtype else None, device=device, weight_format=args.weight_format,
        attention=args.attention, offload=args.offload or "release", family=family, runtime=runtime,
        condition_cache=ConditionCache(cache_dir) if cache_dir else None)
    return pipe, {name: file_fingerprint(path) for name, path in given.items() if path}


def _dit_family(path: str, override: str | None) -> str:
    from .dit.loading import scan_dit

    return override or scan_dit(path).family


def _input_paths(args: argparse.Namespace) -> list[str]:
    """Every file or folder the run reads: no output may land on one of them."""
    paths = [args.prompt_file, *(args.ref or []), *(args.mask or [])]
    paths += [getattr(args, name, None) for name in PATH_ARGS]
    paths += [str(path) for path in _lora_paths(args)]
    return [str(p) for p in paths if p and isinstance(p, (str, Path))]


def _lora_paths(args: argparse.Namespace) -> list[Path]:
    from .lora_specs import parse_lora_spec

    return [parse_lora_spec(spec)[0] for spec in args.lora]


class StageDisplay:
    """What a CLI run is doing: loading, conditioning, sampling (a bar over the steps), decoding, writing.

    ``on_stage`` and ``progress`` are the pipeline's hooks; ``where()`` words a cancel."""

    LABELS = {"loading": "loading models", "conditioning": "conditioning (planner, text encoder, references)",
              "decoding": "decoding the video (VAE)", "writing": "writing the video and its sidecar"}

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.stage = "loading"
        self.done = 0
        self.bar = None
        self.window_at: tuple[int, int] | None = None

    def on_stage(self, stage: str) -> None:
        self.close()
        self.stage = stage
        if stage == "sampling":
            from tqdm import tqdm

            log.info("sampling (%d steps)", self.steps)
            self.bar = tqdm(total=self.steps, desc="sampling", unit="step")
        else:
            log.info("%s", self.LABELS.get(stage, stage))

    def progress(self, step: int, total: int, latents: Any) -> None:
        self.done = step
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def window(self, index: int, total: int) -> None:
        """A context window begins (the bar shows which; a cancel names it)."""
        self.window_at = (index + 1, total)
        if self.bar is not None:
            self.bar.set_postfix_str(f"window {index + 1}/{total}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def where(self) -> str:
        if self.stage == "sampling":
            window = f", window {self.window_at[0]} of {self.window_at[1]}" if self.window_at else ""
            return f"at step {min(self.done + 1, self.steps)} of {self.steps}{window}"
        return f"while {self.LABELS.get(self.stage, self.stage)}"


def generation_settings(args: argparse.Namespace, prompt: str, family: str, smoke: bool):
    """The run's settings: what the user gave, the family's official values (the smoke model's own) for the rest."""
    from .pipeline import GenerationSettings, defaults_for

    defaults = {**defaults_for(family), **(SMOKE_DEFAULTS if smoke else {})}
    given = dict(negative_prompt=args.negative_prompt, width=args.width, height=args.height, num_frames=args.frames,
                 steps=args.steps, guidance=args.guidance, shift=args.shift, sampler=args.sampler, fps=args.fps)
    return GenerationSettings(
        prompt=prompt, **{k: defaults[k] if v is None else v for k, v in given.items()}, seed=args.seed,
        refine_prompt=args.refine_prompt, refine_seed=args.refine_seed, mask_mode=args.mask_mode,
        cfg_batch=args.cfg_batch, clip_resize_antialias=args.clip_antialias,
        step_cache=args.step_cache, context_frames=args.context_frames, context_overlap=args.context_overlap,
        context_schedule=args.context_schedule, context_fuse=args.context_fuse)


def run_generate(args: argparse.Namespace) -> int:
    from .preflight import check_device, check_images, check_model_paths, check_output_paths, read_prompt_file

    missing = [flag for flag, given in (("--ref", args.ref), ("--prompt or --prompt-file", args.prompt is not None
                                        or args.prompt_file), ("--out", args.out)) if not given]
    if missing:
        raise InputError(f"generate needs {' and '.join(missing)} (or --batch CASES --out-dir DIR for a case file).")
    # Preflight: everything that can be checked before a model loads (bindweave_core.preflight).
    check_option_conflicts(args)
    out, _ = check_output_paths(args.out, _input_paths(args))
    prompt = args.prompt if args.prompt is not None else read_prompt_file(args.prompt_file)
    if args.mask and len(args.mask) != len(args.ref):
        raise InputError(f"{len(args.mask)} masks for {len(args.ref)} references: give one --mask per --ref.")
    check_images(args.ref, args.mask)
    check_model_paths({**{f"--{n.replace('_', '-')}": getattr(args, n) for n in PATH_ARGS},
                       **{f"--lora {spec}": str(path) for spec, path in zip(args.lora, _lora_paths(args))}})
    check_device(args.device)
    smoke, family = resolve_model_args(args)
    settings = generation_settings(args, prompt, family, smoke)
    from .families import family_for

    model_family = family_for(family)
    model_family.check_reference_count(len(args.ref))  # the settings' values were checked when they were made
    if args.evaluate:
        from .evaluate.generated import check_can_evaluate

        check_can_evaluate(model_family.encoders, args.clip_vision, smoke)
    loras = None
    if args.lora:  # read whole (NaN/inf refused) before any model; their shapes once the DiT is known
        from .lora_specs import load_lora_specs

        loras = load_lora_specs(args.lora)

    display = StageDisplay(settings.steps)
    try:
        display.on_stage("loading")
        pipe, model_info = build_pipeline(args)
        if args.lora:
            from .lora_specs import add_loras

            add_loras(pipe, args.lora, loras)
            model_info["loras"] = list(args.lora)
        from .dit.parallel import rank

        if rank() != 0:  # multi-GPU: every rank computes, rank 0 writes
            pipe.generate(args.ref, settings, masks=args.mask)
            return 0
        result = generate_to_file(pipe, args.ref, settings, out, masks=args.mask, callback=display.progress,
                                  on_stage=display.on_stage, window_callback=display.window, evaluate=args.evaluate,
                                  smoke=smoke, sidecar={
            "references": [str(r) for r in args.ref], "masks": args.mask or [], "models": model_info,
            "family": pipe.dit_family,
            "dtype": args.dtype or ("bf16" if pipe.device.type == "cuda" else "fp32"),
            "weight_format": args.weight_format, "attention": args.attention, "runtime": pipe.runtime.to_dict()})
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (bindweave_core.signals): the temporary files are gone
        display.close()
        how = "cancelled" if signal_name(e) == "Ctrl-C" else "terminated (SIGTERM)"
        raise GenerationCancelled(f"{how} {display.where()}; no file was written", exit_code(e)) from None
    finally:
        display.close()
    log.info("wrote %s (%d frames, %dx%d, %d fps) and %s", out, result.frames_written, settings.width,
             settings.height, settings.fps, out.with_suffix(".json").name)
    return 0


def generate_to_file(pipe, references: list, settings, out: str | Path, *, masks: list | None = None,
                     callback=None, sidecar: dict[str, Any] | None = None, on_stage=None, window_callback=None,
                     evaluate: bool = False, smoke: bool = False):
    """Generate, then write ``out`` (MP4) and its ``.json`` sidecar. The paths are checked first (writable,
    not a folder, not one of the input files). The frames are decoded in the VAE's causal chunks straight
    into the MP4 writer (memory depends on a chunk, not on the length). Nothing is written unless the
    generation finishes: a cancel or an error leaves no file (not even a partial one) behind. ``evaluate``:
    score the video as written against the references into the sidecar's ``"evaluation"``
    (``bindweave_core.evaluate.generated``)."""
    from .preflight import check_output_paths
    from .video_io import Mp4Writer, atomic_path, read_video

    inputs = [str(r) for r in [*references, *(masks or [])] if isinstance(r, (str, Path))]
    out, sidecar_path = check_output_paths(out, inputs)
    # both files appear together, or neither does
    with atomic_path(sidecar_path) as tmp_json, atomic_path(out) as tmp_mp4:
        with Mp4Writer(tmp_mp4, fps=settings.fps) as writer:
            result = pipe.generate(references, settings, masks=masks, callback=callback, on_stage=on_stage,
                                   window_callback=window_callback, frame_sink=writer.write)
            if on_stage is not None:
                on_stage("writing")
        # the evaluation reads the video as written (its frames were streamed into the file, not kept)
        _write_sidecar(pipe, result, out, tmp_mp4, tmp_json, sidecar, writer.frames, references,
                       (lambda: read_video(tmp_mp4)[0]) if evaluate else None, smoke)
    return result


def _write_sidecar(pipe, result, out: Path, video: Path, json_path: Path, sidecar: dict[str, Any] | None,
                   frames_written: int, references: list, evaluate_frames: Any, smoke: bool) -> dict[str, Any]:
    """Write the sidecar record of ``result`` (its video complete at ``video``, named ``out``) to ``json_path``;
    ``evaluate_frames``: None, or a callable giving the video's frames to score against ``references``."""
    from .batch_outputs import file_sha256
    from .video_io import write_json

    settings = result.settings
    record = {**(sidecar or {}), "settings": settings.to_dict(), "prompt_used": result.prompt,
              "seed": settings.seed, "device": str(pipe.device), "timings": result.timings,
              "frames_written": frames_written, "versions": _versions(), "output": str(out),
              "memory_estimate_gib": _estimate_gib(pipe), "context_windows": result.windows,
              "video_sha256": file_sha256(video), "step_cache": result.step_cache}
    if evaluate_frames is not None:
        from .evaluate.generated import evaluate_generated

        record["evaluation"] = evaluate_generated(pipe, references, evaluate_frames(), prompt=result.prompt,
                                                  fps=settings.fps, windows=result.windows or record.get("windows"),
                                                  smoke=smoke)
    write_json(record, json_path)
    return record


def write_outputs(pipe, result, out: Path, sidecar_path: Path, sidecar: dict[str, Any] | None = None, *,
                  references: list | None = None, evaluate: bool = False, smoke: bool = False) -> dict[str, Any]:
    """A result held in memory (the batch command's): the video, then its sidecar (with the video's sha256 and,
    with ``evaluate``, the evaluation of ``references`` against it), each to a temporary name and renamed: the
    sidecar appears last, so a sidecar always describes a complete video. Returns the sidecar's record."""
    from .video_io import atomic_path, write_mp4

    with atomic_path(sidecar_path) as tmp_json:  # both files appear together, or neither does
        write_mp4(result.frames, out, fps=result.settings.fps)
        return _write_sidecar(pipe, result, out, out, tmp_json, sidecar, int(result.frames.shape[0]),
                              references or [], (lambda: result.frames) if evaluate else None, smoke)


def _estimate_gib(pipe) -> float | None:
    est = getattr(pipe, "last_estimate", None)
    return round(est.total / 2**30, 2) if est is not None else None


def _versions() -> dict[str, str]:
    import diffusers
    import torch
    import transformers

    return {"bindweave": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "platform": platform.platform()}

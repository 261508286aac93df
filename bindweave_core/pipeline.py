"""The public generation API: prompt + 1-4 reference images -> video frames.

    from bindweave_core.pipeline import BindWeavePipeline, GenerationSettings
    pipe = BindWeavePipeline.from_files(dit=..., vae=..., text_encoder=..., clip_vision=..., planner=...)
    result = pipe.generate(["man.png"], GenerationSettings(prompt="..."))
    result.frames  # [N, H, W, 3] float in 0..1

Order of work: planner -> text -> references -> DiT -> decode. Each model is put on the compute
device only while it runs; afterwards it is moved to the CPU (``offload="model"``, default), kept
(``"none"``) or released entirely (``"release"``: components given as loader functions are loaded
again when next needed, which keeps only one big model in memory at a time).

The conditioning follows the DiT's family: BindWeave (planner + CLIP + 4 temporal reference slots)
or Kaleido (R-RoPE: UMT5 only, 1-3 clean reference latents in front of the video); the family object
(``bindweave_core.families``) prepares and encodes the references, builds the DiT inputs and gives
the official settings (``defaults_for(family)``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from . import constants as C
from .condition_cache import ConditionCache, model_identity, shared_cache
from .conditioning import PlannerStates, ReferenceCondition, TextStates, VideoGeometry
from .context_windows import (
    DEFAULT_CONTEXT_FUSE,
    DEFAULT_CONTEXT_OVERLAP,
    DEFAULT_CONTEXT_SCHEDULE,
    ContextWindow,
    check_context,
    longest_dit_window,
    plan_windows,
    window_latent_frames,
    windowed_predictor,
)
from .contract import pixel_frames
from .denoiser import DiTBranch, make_predictor
from .device_memory import release_memory
from .encoders.base import Encoder
from .errors import InputError
from .families import ModelFamily, family_for
from .finite import check_finite, model_dtype
from .lazy import Lazy
from .preflight import check_device
from .references import check_reference_sizes
from .runtime import RuntimeOptions, oom_guard, preflight, prepare_component, wrap_predictor
from .sampling import GuidanceInputs, ProgressCallback, denoise, guidance_batch, seeded_noise
from .setting_bounds import SETTINGS, check_prompt, check_reference_count, check_setting
from .step_cache import StepCache

if TYPE_CHECKING:
    from .encoders.vae import WanVAE

log = logging.getLogger("BindWeave")

OFFLOAD_MODES = C.OFFLOAD_MODES
COMPONENTS = ("planner", "text_encoder", "clip_vision", "vae", "dit")


@dataclass
class GenerationSettings:
    """Every user-visible setting of one generation (the CLI's sidecar JSON is this, as a dict)."""

    prompt: str
    negative_prompt: str = C.DEFAULT_NEGATIVE_PROMPT
    planner_negative_prompt: str = C.DEFAULT_PLANNER_NEGATIVE_PROMPT
    width: int = C.DEFAULT_WIDTH
    height: int = C.DEFAULT_HEIGHT
    num_frames: int = C.DEFAULT_FRAMES
    steps: int = C.DEFAULT_STEPS
    guidance: float = C.DEFAULT_GUIDANCE
    shift: float = C.DEFAULT_SHIFT
    sampler: str = C.DEFAULT_SAMPLER
    seed: int = C.DEFAULT_SEED
    fps: int = C.DEFAULT_FPS
    refine_prompt: bool = False
    refine_seed: int | None = None
    mask_mode: str = "rectangle"
    clip_resize_antialias: bool = C.CLIP_RESIZE_ANTIALIAS  # True: torchvision >= 0.17's resize (docs/fidelity.md)
    cfg_batch: str = "auto"  # "auto" | "batched" | "separate"
    step_cache: float = 0.0  # EasyCache threshold; 0 = off (every step computed); C.DEFAULT_STEP_CACHE = 0.05
    # Context windows (bindweave_core.context_windows), in video frames: 0 = off (the whole video is one clip)
    context_frames: int = 0
    context_overlap: int = DEFAULT_CONTEXT_OVERLAP
    context_schedule: str = DEFAULT_CONTEXT_SCHEDULE
    context_fuse: str = DEFAULT_CONTEXT_FUSE

    def __post_init__(self) -> None:
        """Every field checked and normalised once, as it comes in (``bindweave_core.setting_bounds``): numpy
        scalars and ints for floats become plain Python values; a str where a number goes, a non-integer
        step count, NaN, a value out of range or an unknown name is an :class:`InputError`."""
        for name in SETTINGS:
            value = getattr(self, name)
            setattr(self, name, check_prompt(value) if name == "prompt" else check_setting(name, value))
        check_context(self.context_frames, self.context_overlap)  # how the window fields fit together

    def validate(self, num_references: int, max_references: int = C.MAX_REFERENCES) -> None:
        """The reference count against the model's (the values themselves were checked when the settings were
        made)."""
        check_reference_count(num_references, max_references)

    def windows(self) -> list[ContextWindow]:
        """The context windows over the video's latent frames (one window: the whole video, as without)."""
        return plan_windows(C.latent_frames(self.num_frames), self.context_frames, self.context_overlap,
                            self.context_schedule)

    @property
    def condition_frames(self) -> int:
        """Video frames of the longest clip the DiT sees (the whole video, or the longest window with its
        anchor frame): the length of the video condition, computed once for every window."""
        return pixel_frames(longest_dit_window(self.windows()))

    @property
    def latent_shape(self) -> tuple[int, int, int, int, int]:
        return (1, C.LATENT_CHANNELS, C.latent_frames(self.num_frames),
                self.height // C.VAE_SPATIAL_FACTOR, self.width // C.VAE_SPATIAL_FACTOR)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def defaults_for(family: str) -> dict[str, Any]:
    """A model family's official sampling settings, as ``GenerationSettings`` keyword arguments.

    ``GenerationSettings``' own defaults are BindWeave's; Kaleido (R-RoPE) uses 896x512, 81 frames,
    rf-euler shift 7, 50 steps, guidance 6 and its own negative prompt (``bindweave_core.families``).
    """
    return family_for(family).defaults()


@dataclass
class GenerationResult:
    frames: torch.Tensor  # [N, H, W, 3] float 0..1 on the CPU
    latents: torch.Tensor  # [1, 16, T, h, w] float32
    prompt: str  # the prompt the models saw (the refined one when refinement was on)
    settings: GenerationSettings
    timings: dict[str, float] = field(default_factory=dict)
    step_cache: dict[str, Any] | None = None  # what the step cache did (None when it was off)
    windows: list[dict[str, Any]] | None = None  # the context windows (None: the video was one clip)
    frames_written: int | None = None  # frames handed to ``frame_sink`` (``frames`` is then empty)


def _frames(video: torch.Tensor) -> torch.Tensor:
    """VAE output ``[1, 3, n, H, W]`` in [-1, 1] -> frames ``[n, H, W, 3]`` in 0..1 on the CPU."""
    return ((video[0].float().permute(1, 2, 3, 0) + 1) / 2).clamp(0, 1).cpu()


def _checking_first_calls(predict: Callable, calls: int, dtype: torch.dtype) -> Callable:
    """``predict`` whose first ``calls`` outputs (the first step's velocities) are checked for NaN/inf: a DiT
    that overflows does so at once, and finding it at step 1 saves the whole run."""
    left = [calls]

    def checked(latents: torch.Tensor, timestep: torch.Tensor, branches: str) -> torch.Tensor:
        out = predict(latents, timestep, branches)
        if left[0] > 0:
            left[0] -= 1
            check_finite(out, stage=f"first step's velocity ({branches})", model="the DiT", dtype=dtype)
        return out

    return checked


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class BindWeavePipeline:
    """Holds the five models (or functions that load them) and runs a generation."""

    def __init__(self, *, dit: Any, vae: Encoder | Lazy | None, text_encoder: Encoder | Lazy | None,
                 clip_vision: Encoder | Lazy | None = None, planner: Encoder | Lazy | None = None,
                 device: str | torch.device | None = None, offload: str = "model", planner_cache: Any = None,
                 runtime: RuntimeOptions | None = None, condition_cache: ConditionCache | None = None):
        if offload not in OFFLOAD_MODES:
            raise ValueError(f"offload must be one of {OFFLOAD_MODES}, got {offload!r}")
        check_device(device)
        self.device = torch.device(device) if device is not None else default_device()
        self.offload = offload
        # Conditions reused while their inputs are unchanged (video condition, text, planner, references).
        # ``planner_cache`` (a directory) is the older name of a disk condition cache.
        if condition_cache is None and planner_cache is not None:
            condition_cache = ConditionCache(planner_cache)
        self.condition_cache = condition_cache if condition_cache is not None else shared_cache()
        self.last_step_cache = None  # StepCacheStats of the last sample() with the step cache on
        self.runtime = runtime or RuntimeOptions()  # block offload, compile, multi-GPU, VAE tiling, memory check
        self.last_estimate = None  # the memory estimate of the last generate()
        self._components: dict[str, Any] = dict(dit=dit, vae=vae, text_encoder=text_encoder,
                                                clip_vision=clip_vision, planner=planner)
        self._loaded: dict[str, Any] = {}

    # ------------------------------------------------------------------------------- construction
    @classmethod
    def smoke(cls, seed: int = 0, device: str | torch.device = "cpu", family: str = "bindweave",
              **kwargs) -> "BindWeavePipeline":
        """Tiny random models of the real architectures, built in memory (no weights needed).

        ``family="kaleido"``: the tiny R-RoPE DiT with UMT5 and VAE only.
        """
        from .smoke import smoke_components

        return cls(**smoke_components(seed, family), device=device, **kwargs)

    @classmethod
    def from_files(cls, *, dit: str, vae: str, text_encoder: str, clip_vision: str | None = None,
                   planner: str | None = None, planner_tokenizer: str | None = None,
                   text_tokenizer: str | None = None, dtype: torch.dtype | None = None,
                   device: str | torch.device | None = None, weight_format: str = "default",
                   attention: str = "sdpa", offload: str = "release", planner_cache: Any = None,
                   family: str | None = None, runtime: RuntimeOptions | None = None,
                   condition_cache: ConditionCache | None = None) -> "BindWeavePipeline":
        """Models from files/directories; each is loaded when first needed (see ``offload``).

        ``family`` overrides the family read from the DiT checkpoint (e.g. ``kaleido`` for Kaleido
        weights converted to another layout, which then read as plain ``wan-t2v``).
        """
        from .dit.loading import load_dit, scan_dit
        from .encoder_loaders import encoder_loaders

        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        scanned = scan_dit(dit)
        config = scanned.config.replace(family=family) if family and family != scanned.family else None
        if config is not None:
            family_for(config).check_dit(config, dit, scanned.family)

        loaders = dict(
            dit=Lazy(lambda: load_dit(dit, dtype=dtype, weight_format=weight_format, attention_backend=attention,
                                      config=config),
                     str(dit), family=family or scanned.family,
                     meta={"config": config or scanned.config, "dtype": dtype, "weight_format": weight_format}),
            **encoder_loaders(vae=vae, text_encoder=text_encoder, clip_vision=clip_vision, planner=planner,
                              planner_tokenizer=planner_tokenizer, text_tokenizer=text_tokenizer, dtype=dtype),
        )
        return cls(**loaders, device=device, offload=offload, planner_cache=planner_cache, runtime=runtime,
                   condition_cache=condition_cache)

    # ------------------------------------------------------------------------------- model placement
    def component(self, name: str) -> Any:
        """The loaded component (loading it first if it was given as a loader function)."""
        if name in self._loaded:
            return self._loaded[name]
        value = self._components[name]
        if value is None:
            raise InputError(f"no {name.replace('_', ' ')} model was given; this model family needs one.")
        if isinstance(value, Lazy):
            t0 = time.perf_counter()
            value = value.load()
            log.info("loaded %s in %.1f s", name, time.perf_counter() - t0)
        self._loaded[name] = value
        return value

    def current(self, name: str) -> Any:
        """Component ``name`` as it stands, without loading it: the loaded model, else what was given (a
        model, a :class:`~bindweave_core.lazy.Lazy` loader, or None)."""
        return self._loaded.get(name) or self._components[name]

    def loaded(self, name: str) -> Any:
        """Component ``name`` if it is loaded now, else None."""
        return self._loaded.get(name)

    def transform_component(self, name: str, transform: Callable[[Any], Any]) -> None:
        """Apply ``transform`` (model -> model) to component ``name``: now if it is a model, at every load if
        it is given as a loader function (``offload="release"`` loads it again for each run)."""
        value = self._components[name]
        if value is None:
            raise InputError(f"no {name.replace('_', ' ')} model was given to transform.")
        if isinstance(value, Lazy):
            load = value.load
            self._components[name] = replace(value, load=lambda: transform(load()))
            self._loaded.pop(name, None)
            return
        self._components[name] = transform(value)
        if name in self._loaded:
            self._loaded[name] = self._components[name]

    @staticmethod
    def _module(component: Any) -> torch.nn.Module:
        return component if isinstance(component, torch.nn.Module) else component.model

    @contextmanager
    def on_device(self, name: str):
        """Run with component ``name`` on the compute device, then apply the offload policy."""
        comp = self.component(name)
        module = self._module(comp)
        prepare_component(name, comp, module, self.runtime, self.device)  # .to(device), or DiT offload/compile/CP
        try:
            yield comp
        finally:
            if self.offload == "release" and isinstance(self._components[name], Lazy):
                self._loaded.pop(name, None)  # dropped; loaded again when next needed
                del comp, module
                release_memory()
            elif self.offload != "none" and self.device.type != "cpu":
                module.to("cpu")
                release_memory()
            # offload "none": the model stays put (the ComfyUI nodes' case: ComfyUI moves models)

    @property
    def dit_family(self) -> str:
        dit = self.current("dit")
        if dit is None:
            return "bindweave"
        if isinstance(dit, Lazy):
            return dit.family or "bindweave"
        return dit.dit_config.family

    @property
    def family(self) -> ModelFamily:
        """The family object of the DiT (BindWeave when there is none): see ``bindweave_core.families``."""
        return family_for(self.dit_family)

    # ------------------------------------------------------------------------------- stages
    def refine_prompt(self, prompt: str, images: list, seed: int | None = None) -> str:
        """The planner rewrites the prompt: greedy without a seed, seeded sampling with one."""
        with self.on_device("planner") as planner:
            return planner.refine_prompt(prompt, images, seed=seed, do_sample=seed is not None)

    def model_identity(self, name: str) -> tuple[str, bool]:
        """``(identity, persistent)`` of a component for the condition cache; a component given as a file
        (``from_files``) is identified by its files without being loaded, another loader function by itself."""
        value = self.current(name)
        if isinstance(value, Lazy):  # not loaded just to name it: its files, else this loader (this process only)
            return (value.meta["identity"], True) if "identity" in value.meta else (f"lazy:{id(value)}", False)
        return model_identity(value)

    def cached(self, kind: str, models: tuple[str, ...], parts: dict[str, Any], compute) -> dict[str, torch.Tensor]:
        """``compute()`` through the condition cache, keyed by ``parts`` and the identities of ``models``."""
        ids = [self.model_identity(m) for m in models]
        key = {**parts, "models": [i for i, _ in ids], "device": str(self.device)}
        return self.condition_cache.get(kind, key, compute, persistent=all(p for _, p in ids))

    def encode_planner(self, prompt: str, images: list, negative_prompt: str) -> PlannerStates:
        from .encoders.planner import check_images, image_digest

        def compute() -> dict[str, torch.Tensor]:
            with self.on_device("planner") as planner:
                states = planner.encode(prompt, images, negative_prompt=negative_prompt)
                for t in (states.positive, states.negative):  # fp16 overflows in the 7B planner: stop here
                    check_finite(t, stage="planner states", model="the planner (Qwen2.5-VL)",
                                 dtype=model_dtype(planner))
            return {"positive": states.positive, "negative": states.negative}

        digests = [image_digest(im) for im in check_images(images)]
        out = self.cached("planner", ("planner",), {"prompt": prompt, "negative_prompt": negative_prompt,
                                                    "images": digests}, compute)
        return PlannerStates(positive=out["positive"], negative=out["negative"])

    def encode_text(self, prompt: str, negative_prompt: str) -> TextStates:
        def compute() -> dict[str, torch.Tensor]:
            with self.on_device("text_encoder") as text:
                states = text.encode([prompt, negative_prompt])
                check_finite(states, stage="text encoder states", model="the text encoder (UMT5-XXL)",
                             dtype=model_dtype(text))
            return {"positive": states[:1], "negative": states[1:]}

        out = self.cached("text", ("text_encoder",), {"prompts": [prompt, negative_prompt]}, compute)
        return TextStates(positive=out["positive"], negative=out["negative"])

    def encode_references(self, images: list, settings: GenerationSettings, masks: list | None = None,
                          family: str | None = None) -> ReferenceCondition:
        """The references as the DiT of ``family`` (default: the loaded DiT's) takes them: BindWeave's
        CLIP tokens + temporal slots, or Kaleido's clean latents of white-letterboxed canvases."""
        check_reference_sizes(images)
        refs = family_for(family or self.dit_family).encode_references(self, images, settings, masks)
        if refs.geometry is None:  # stated, so every DiT call checks its latent against it
            refs.geometry = VideoGeometry(settings.width, settings.height, settings.num_frames)
        return refs

    def vae_tiling_active(self) -> bool:
        """Whether the VAE encodes tiled (a key of the cached reference conditions)."""
        return self.runtime.vae_tiling or bool(getattr(self._loaded.get("vae"), "tiling", False))

    def video_condition(self, vae: WanVAE, settings: GenerationSettings) -> torch.Tensor:
        """The all-zero video's condition (kept in the condition cache per VAE, size, frames, dtype, device)."""
        return vae.video_condition(settings.condition_frames, settings.height, settings.width,
                                   cache=self.condition_cache).cpu()

    def branches(self, text: TextStates, planner: PlannerStates | None, refs: ReferenceCondition) -> tuple[DiTBranch, DiTBranch]:
        """The guidance branches of the family the references were encoded for."""
        return family_for(refs.family).branches(text, planner, refs)

    def sample(self, cond: DiTBranch, uncond: DiTBranch, settings: GenerationSettings,
               callback: ProgressCallback | None = None,
               window_callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """The denoised latents. With several context windows, ``window_callback(index, total)`` is called
        before each window's DiT call (progress; raising cancels between windows)."""
        with self.on_device("dit") as dit:
            dtype = dit.patch_embedding.weight.dtype
            cond, uncond = cond.to(self.device, dtype), uncond.to(self.device, dtype)
            windows = settings.windows()
            if len(windows) == 1:  # the whole video as one clip: exactly as without windows
                predict = make_predictor(dit, cond, uncond)
            else:
                predict = self._windowed_predictor(dit, cond, uncond, windows, settings, window_callback)
            batch_cfg = self.runtime.parallel == "cfg" or self._batch_cfg(settings)
            first_step_calls = 1 if settings.guidance == 1.0 or batch_cfg else 2  # sampling.guided_velocity
            predict = _checking_first_calls(predict, first_step_calls, dtype)
            inputs = GuidanceInputs(predict=wrap_predictor(predict, self.runtime), guidance=settings.guidance,
                                    batch_cfg=batch_cfg)
            noise = seeded_noise(settings.latent_shape, settings.seed).to(self.device)
            dit_batch = guidance_batch(settings.guidance, batch_cfg, self.runtime.parallel == "cfg")
            step_cache = StepCache(settings.step_cache) if settings.step_cache > 0 else None
            with oom_guard(self, settings, dit_batch):
                latents = denoise(inputs, noise, steps=settings.steps, sampler=settings.sampler,
                                  shift=settings.shift, callback=callback, step_cache=step_cache).cpu()
            check_finite(latents, stage="final latents", model="the DiT", dtype=dtype)
            self.last_step_cache = step_cache.stats if step_cache is not None else None
            if step_cache is not None:
                log.info("%s", step_cache.stats.summary())
            return latents

    @staticmethod
    def _windowed_predictor(dit: Any, cond: DiTBranch, uncond: DiTBranch, windows: list[ContextWindow],
                            settings: GenerationSettings, window_callback: Callable[[int, int], None] | None):
        """Each window an ordinary clip to the DiT: one predictor per window length, over the branches' window
        (same reference tensors, the window-length video condition), fused per step."""
        predictors: dict[int, Any] = {}

        def predictor_for(frames: int):
            if frames not in predictors:
                predictors[frames] = make_predictor(dit, cond.window(frames), uncond.window(frames))
            return predictors[frames]

        def on_window(index: int, total: int) -> None:
            log.debug("context window %d of %d", index + 1, total)
            if window_callback is not None:
                window_callback(index, total)

        _, overlap = window_latent_frames(settings.context_frames, settings.context_overlap)
        log.info("context windows: %d windows of %d frames (overlap %d) over %d frames", len(windows),
                 settings.context_frames, settings.context_overlap, settings.num_frames)
        return windowed_predictor(windows, predictor_for, C.latent_frames(settings.num_frames), overlap,
                                  settings.context_fuse, on_window)

    def _batch_cfg(self, settings: GenerationSettings) -> bool:
        if settings.cfg_batch != "auto":
            return settings.cfg_batch == "batched"
        # Batching cond+uncond doubles the activations; on a GPU do it only with room to spare.
        if self.device.type != "cuda":
            return True
        from .memory import fits_batched_cfg

        return fits_batched_cfg(self.component("dit"), settings, self.device)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        with self.on_device("vae") as vae:
            video = vae.decode(latents.to(self.device))
        return _frames(video)

    def decode_to(self, latents: torch.Tensor, sink: Callable[[torch.Tensor], None]) -> int:
        """Decode in the VAE's causal chunks, handing each chunk's frames ``[n, H, W, 3]`` to ``sink`` (the
        MP4 writer): memory depends on a chunk, not on the video's length. Returns the frames written; the
        frames equal :meth:`decode`'s."""
        written = 0
        with self.on_device("vae") as vae:
            for chunk in vae.decode_chunks(latents.to(self.device)):
                frames = _frames(chunk)
                sink(frames)
                written += int(frames.shape[0])
        return written

    # ------------------------------------------------------------------------------- everything
    def generate(self, references: list, settings: GenerationSettings, masks: list | None = None,
                 callback: ProgressCallback | None = None,
                 on_stage: Callable[[str], None] | None = None,
                 window_callback: Callable[[int, int], None] | None = None,
                 frame_sink: Callable[[torch.Tensor], None] | None = None) -> GenerationResult:
        """Prompt + references -> frames. See the module docstring for the order of work.

        ``on_stage`` is called with ``"conditioning"``, ``"sampling"`` and ``"decoding"`` as each begins;
        ``window_callback(index, total)`` before each context window's DiT call. With ``frame_sink`` the
        frames are decoded in chunks and handed to it (``result.frames`` is then empty)."""
        from PIL import Image

        from .images import to_8bit
        from .references import load_image

        stage = on_stage or (lambda name: None)

        family = self.family
        family.check_reference_count(len(references))  # the settings' values were checked when they were made
        family.check_settings(settings)
        if self.runtime.memory_check:  # an encoder whose weights alone cannot fit: refused before any loads
            from .stage_memory import check_encoder_stages

            check_encoder_stages(self, family.encoders)
        self.last_estimate = preflight(self, settings)  # logs the estimated peak; OutOfMemoryError if it can't fit
        images = [load_image(r) if isinstance(r, (str, bytes)) or hasattr(r, "__fspath__")
                  else to_8bit(r) if isinstance(r, Image.Image) else r for r in references]  # 8-bit RGB(A)
        # letterboxed now, before the planner runs: a bad reference, tensor or mask costs no model time
        check_reference_sizes(images)
        canvases, pixel_masks = family.prepare_references(images, settings.width, settings.height, masks,
                                                          settings.mask_mode)
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        stage("conditioning")
        prompt = settings.prompt
        if settings.refine_prompt:
            prompt = self.refine_prompt(prompt, images, seed=settings.refine_seed)
            log.info("refined prompt: %s", prompt)
        planner = None
        if self._components["planner"] is not None and "planner" in family.encoders:  # Kaleido: UMT5 only
            planner = self.encode_planner(prompt, images, settings.planner_negative_prompt)
        text = self.encode_text(prompt, settings.negative_prompt)
        refs = family.encode_canvases(self, canvases, pixel_masks, settings)
        timings["conditioning_s"] = time.perf_counter() - t0
        cond, uncond = self.branches(text, planner, refs)
        t1 = time.perf_counter()
        stage("sampling")
        latents = self.sample(cond, uncond, settings, callback, window_callback)
        timings["sampling_s"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        stage("decoding")
        written = None
        if frame_sink is None:
            frames = self.decode(latents)
        else:
            written, frames = self.decode_to(latents, frame_sink), torch.zeros(0, settings.height, settings.width, 3)
        timings["decode_s"] = time.perf_counter() - t2
        stats = self.last_step_cache.to_dict() if settings.step_cache > 0 and self.last_step_cache else None
        windows = settings.windows()
        return GenerationResult(frames=frames, latents=latents, prompt=prompt, settings=replace(settings),
                                timings=timings, step_cache=stats, frames_written=written,
                                windows=[w.describe() for w in windows] if len(windows) > 1 else None)

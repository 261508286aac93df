"""The trainer's configuration: a YAML file of eight sections, checked before anything runs.

Every key, its default and its meaning is in ``training/configs/example.yaml``. Relative paths are
taken from the working directory. ``--set section.key=value`` on the command line overrides a key
(the value is read as YAML).
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bindweave_core import constants as C
from bindweave_core.config import FAMILIES
from bindweave_core.errors import InputError
from bindweave_core.lora import DEFAULT_TARGETS
from bindweave_core.setting_bounds import check_setting


@dataclass
class ModelSection:
    smoke: bool = False  # the built-in tiny random models (tests, trying the trainer without weights)
    smoke_seed: int = 0
    family: str | None = None  # null: from the checkpoint (smoke: bindweave); kaleido for R-RoPE weights
    dit: str | None = None
    vae: str | None = None
    text_encoder: str | None = None
    text_tokenizer: str | None = None
    clip_vision: str | None = None  # null for families without CLIP (Kaleido)
    planner: str | None = None  # null: no planner states (families without the connector)
    planner_tokenizer: str | None = None
    dtype: str = "bfloat16"  # the frozen weights (DiT and encoders)
    weight_format: str = "default"  # DiT base weights: default | fp8 (block linears in fp8, for 24 GB cards)
    attention: str = "sdpa"


@dataclass
class DataSection:
    path: str = ""  # a folder (sample folders, or videos/images with same-name .txt captions) or a JSONL file
    # several datasets, each {path: ..., repeats: N} (N: how often each sample counts per epoch); instead of path
    datasets: list[dict] = field(default_factory=list)
    # 4k+1 frame counts (frame buckets): each clip takes the longest one it can supply; images are 1-frame clips
    num_frames: list[int] = field(default_factory=lambda: [81])
    fps: float = C.DEFAULT_FPS  # frames are sampled at this rate from each video
    frame_sampling: str = "head"  # head (from the start) | uniform (frame_windows windows spread) | chunk (all)
    frame_windows: int = 1  # uniform: windows per clip
    buckets: list[list[int]] = field(default_factory=lambda: [[832, 480], [480, 832], [624, 624]])
    upscale: bool = False  # allow buckets larger than the clip (upscaling it); false: such clips are reported
    mask_mode: str = "rectangle"  # rectangle (official) | alpha (RGBA cut-outs); per sample overridable

    def dataset_list(self) -> list[tuple[str, int]]:
        """``[(path, repeats)]`` of ``datasets`` or of the single ``path``."""
        if self.datasets:
            return [(str(d["path"]), int(d.get("repeats", 1))) for d in self.datasets]
        return [(self.path, 1)]


@dataclass
class AugmentSection:
    variants: int = 4  # cached reference variants per sample; variant 0 is unaugmented, 1 = off
    rotation: float = 10.0  # degrees, uniform in [-rotation, rotation]
    scale: list[float] = field(default_factory=lambda: [0.8, 1.0])  # size on the canvas vs. plain letterbox
    seed: int = 0


@dataclass
class CacheSection:
    dir: str | None = None  # default: <output_dir>/cache
    hash_contents: bool = False  # key samples by file content (sha256) instead of size + mtime
    chunk_size: int = 64  # samples encoded per pass of the encoders
    offload: str = "release"  # encoders between passes: release (free), model (keep on CPU), none


@dataclass
class ObjectiveSection:
    shift: float = C.TRAIN_TIMESTEP_SHIFT  # sigma = shift*u / (1 + (shift-1)*u), u ~ U(0, 1)
    conditioning: str = "auto"  # auto (from the DiT family) | slots (BindWeave) | rrope (Kaleido)
    sigma_sampling: str = "auto"  # auto | shifted (spec 12) | kaleido (sigmoid-normal, resolution shift)
    fixed_sigma: float | None = None  # debugging / overfitting checks: one sigma for every step
    fixed_noise: bool = False  # debugging / overfitting checks: the same noise every step


@dataclass
class LoraSection:
    rank: int = 32
    alpha: float = 32.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))  # names inside each block
    init: str = "default"  # peft init_lora_weights: default (B = 0) | gaussian
    train_connector: bool = False  # also train condition_embedder.text_projector fully


@dataclass
class TrainSection:
    output_dir: str = "output/lora"
    name: str = "bindweave_lora"
    seed: int = 42
    max_steps: int = 2000  # optimizer steps
    batch_size: int = 1  # per GPU and micro-step (items of one bucket)
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant"  # any diffusers.optimization scheduler name
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0  # 0 = no clipping
    mixed_precision: str = "bf16"  # no | fp16 | bf16 (accelerate)
    optimizer: str = "adamw"  # adamw (torch) | adamw8bit (bitsandbytes, CUDA only: about 1/4 of the states)
    gradient_checkpointing: bool = True
    activation_offload: bool = False  # keep the checkpointed block inputs in CPU memory (save_on_cpu)
    blocks_to_swap: int = 0  # DiT blocks whose frozen weights stay in CPU memory, streamed per step
    checkpoint_every: int = 250  # 0 = only at the end
    keep_checkpoints: int = 3
    save_dtype: str = "bfloat16"  # dtype of the exported LoRA file
    tensorboard: bool = False  # also log to tensorboard (needs the tensorboard package; loss.csv always)
    wandb: bool = False  # also log to Weights & Biases (needs the wandb package and a login)
    wandb_project: str = "bindweave-lora"
    resume: str | None = None  # null | latest | a checkpoint folder


@dataclass
class ValidationSection:
    every: int = 0  # steps between preview videos; 0 = none
    prompt: str | None = None  # default: the first training sample's prompt and references
    references: list[str] = field(default_factory=list)
    prompts: list[dict] = field(default_factory=list)  # more previews: each {prompt: ..., references: [...]}
    holdout: int = 0  # samples kept out of training for a validation loss (the last ones, in name order)
    loss_every: int = 0  # steps between validation losses (0: at checkpoints when holdout > 0)
    width: int | None = None  # default: the first bucket
    height: int | None = None
    num_frames: int | None = None  # default: data.num_frames
    steps: int = 30
    guidance: float | None = None  # null: the model family's official value (BindWeave 5.0)
    shift: float | None = None  # null: the family's (BindWeave 3.0)
    sampler: str | None = None  # null: the family's (BindWeave unipc)
    seed: int = 0


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    augment: AugmentSection = field(default_factory=AugmentSection)
    cache: CacheSection = field(default_factory=CacheSection)
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    lora: LoraSection = field(default_factory=LoraSection)
    train: TrainSection = field(default_factory=TrainSection)
    validation: ValidationSection = field(default_factory=ValidationSection)

    # ------------------------------------------------------------------ derived
    @property
    def output_dir(self) -> Path:
        return Path(self.train.output_dir)

    @property
    def cache_dir(self) -> Path:
        return Path(self.cache.dir) if self.cache.dir else self.output_dir / "cache"

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> TrainConfig:
        if not isinstance(raw, dict):
            raise InputError(f"{source}: expected a mapping of sections ({', '.join(_SECTIONS)}), got "
                             f"{type(raw).__name__}.")
        unknown = sorted(set(raw) - set(_SECTIONS))
        if unknown:
            raise InputError(f"{source}: unknown section(s) {', '.join(unknown)}; the sections are "
                             f"{', '.join(_SECTIONS)}.")
        sections = {name: _build(_SECTIONS[name], raw.get(name) or {}, f"{source}: {name}") for name in _SECTIONS}
        cfg = cls(**sections)
        cfg.validate(source)
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] = ()) -> TrainConfig:
        import yaml

        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except OSError as e:
            raise InputError(f"cannot read the config {path}: {e}") from e
        except yaml.YAMLError as e:
            raise InputError(f"{path} is not valid YAML: {e}") from e
        for item in overrides:
            apply_override(raw, item)
        return cls.from_dict(raw, str(path))

    # ------------------------------------------------------------------ checks
    def validate(self, source: str = "config") -> None:
        """Clear messages for settings that cannot work (nothing is silently adjusted)."""
        def bad(msg: str) -> InputError:
            return InputError(f"{source}: {msg}")

        for check in (self._check_models, self._check_data, self._check_augment_and_cache, self._check_objective,
                      self._check_training, self._check_validation, self._check_steps):
            check(bad)

    def _check_models(self, bad: Callable[[str], InputError]) -> None:
        m, t = self.model, self.train
        if not m.smoke and not (m.dit and m.vae and m.text_encoder):
            raise bad("model.dit, model.vae and model.text_encoder are required (or model.smoke: true).")
        if m.dtype not in DTYPES:
            raise bad(f"model.dtype must be one of {sorted(DTYPES)}, got {m.dtype!r}.")
        if t.save_dtype not in DTYPES:
            raise bad(f"train.save_dtype must be one of {sorted(DTYPES)}, got {t.save_dtype!r}.")
        if m.weight_format not in WEIGHT_FORMATS:
            raise bad(f"model.weight_format must be {_one_of(WEIGHT_FORMATS)}, got {m.weight_format!r}.")
        if m.attention not in C.ATTENTION_BACKENDS:
            raise bad(f"model.attention must be {_one_of(C.ATTENTION_BACKENDS)}, got {m.attention!r}.")

    def _check_data(self, bad: Callable[[str], InputError]) -> None:
        d = self.data
        if not d.path and not d.datasets:
            raise bad("data.path is required: a folder of samples or a JSONL file (or data.datasets).")
        if d.path and d.datasets:
            raise bad("give data.path or data.datasets, not both.")
        for i, ds in enumerate(d.datasets):
            if not isinstance(ds, dict) or not isinstance(ds.get("path"), str) or set(ds) - {"path", "repeats"}:
                raise bad(f"data.datasets[{i}] must be {{path: FOLDER_OR_JSONL, repeats: N}}, got {ds!r}.")
            if not isinstance(ds.get("repeats", 1), int) or isinstance(ds.get("repeats"), bool) \
                    or ds.get("repeats", 1) < 1:
                raise bad(f"data.datasets[{i}].repeats must be a whole number >= 1, got {ds.get('repeats')!r}.")
        if not d.num_frames:
            raise bad("data.num_frames needs at least one frame count (4k+1, e.g. 49 or 81).")
        for n in d.num_frames:
            if n < 1 or (n - 1) % C.VAE_TEMPORAL_FACTOR:
                raise bad(f"data.num_frames must be 4k+1 (e.g. 17, 49 or 81), got {n}.")
        if d.frame_sampling not in FRAME_SAMPLING:
            raise bad(f"data.frame_sampling must be one of {', '.join(FRAME_SAMPLING)}, got {d.frame_sampling!r}.")
        if d.frame_windows < 1:
            raise bad(f"data.frame_windows must be at least 1, got {d.frame_windows}.")
        if d.fps <= 0:
            raise bad(f"data.fps must be positive, got {d.fps}.")
        if not d.buckets:
            raise bad("data.buckets needs at least one [width, height].")
        for b in d.buckets:
            if len(b) != 2 or any(not isinstance(v, int) or v < C.SIZE_MULTIPLE or v % C.SIZE_MULTIPLE for v in b):
                raise bad(f"data.buckets entries are [width, height] in multiples of {C.SIZE_MULTIPLE}, got {b}.")
        if d.mask_mode not in C.MASK_MODES:
            raise bad(f"data.mask_mode must be {_one_of(C.MASK_MODES)}, got {d.mask_mode!r}.")

    def _check_augment_and_cache(self, bad: Callable[[str], InputError]) -> None:
        a = self.augment
        if a.variants < 1:
            raise bad(f"augment.variants must be at least 1 (1 = no augmentation), got {a.variants}.")
        if len(a.scale) != 2 or not 0 < a.scale[0] <= a.scale[1]:
            raise bad(f"augment.scale is [min, max] with 0 < min <= max, got {a.scale}.")
        if self.cache.offload not in C.OFFLOAD_MODES:
            raise bad(f"cache.offload must be {_one_of(C.OFFLOAD_MODES)}, got {self.cache.offload!r}.")

    def _check_objective(self, bad: Callable[[str], InputError]) -> None:
        m, o = self.model, self.objective
        conditionings, samplings = (C.AUTO, *C.REFERENCE_CONDITIONINGS), (C.AUTO, *C.SIGMA_SAMPLINGS)
        if o.conditioning not in conditionings:
            raise bad(f"objective.conditioning must be {_one_of(conditionings)}, got {o.conditioning!r}.")
        if o.sigma_sampling not in samplings:
            raise bad(f"objective.sigma_sampling must be {_one_of(samplings)}, got {o.sigma_sampling!r}.")
        if m.family is not None and m.family not in FAMILIES:
            raise bad(f"model.family must be {_one_of(FAMILIES)} (or null: read from the DiT), got {m.family!r}.")
        if o.shift <= 0:
            raise bad(f"objective.shift must be positive, got {o.shift}.")
        if o.fixed_sigma is not None and not 0 <= o.fixed_sigma <= 1:
            raise bad(f"objective.fixed_sigma must be in [0, 1], got {o.fixed_sigma}.")

    def _check_training(self, bad: Callable[[str], InputError]) -> None:
        t, lc = self.train, self.lora
        if lc.rank < 1 or not lc.targets:
            raise bad("lora.rank must be at least 1 and lora.targets non-empty.")
        if not 0 <= lc.dropout < 1:
            raise bad(f"lora.dropout is the fraction of LoRA inputs zeroed, from 0 (off) up to but not including 1; "
                      f"got {lc.dropout}.")
        if lc.alpha <= 0:
            raise bad(f"lora.alpha must be positive (the LoRA is scaled by alpha / rank), got {lc.alpha}.")
        if lc.init not in LORA_INITS:
            raise bad(f"lora.init must be {_one_of(LORA_INITS)}, got {lc.init!r}.")
        if t.lr_scheduler not in LR_SCHEDULERS:
            raise bad(f"unknown train.lr_scheduler {t.lr_scheduler!r}; diffusers' schedulers are "
                      f"{_one_of(LR_SCHEDULERS)}.")
        if not (0 <= t.adam_beta1 < 1 and 0 <= t.adam_beta2 < 1) or t.adam_epsilon <= 0:
            raise bad(f"train.adam_beta1 and adam_beta2 must be in [0, 1) and adam_epsilon positive, got "
                      f"{t.adam_beta1}, {t.adam_beta2}, {t.adam_epsilon}.")
        for name in ("lr_warmup_steps", "weight_decay", "max_grad_norm", "checkpoint_every", "keep_checkpoints"):
            if getattr(t, name) < 0:
                raise bad(f"train.{name} must be 0 or more, got {getattr(t, name)}.")
        if t.mixed_precision not in ("no", "fp16", "bf16"):
            raise bad(f"train.mixed_precision must be no, fp16 or bf16, got {t.mixed_precision!r}.")
        if t.optimizer not in OPTIMIZERS:
            raise bad(f"train.optimizer must be one of {', '.join(OPTIMIZERS)}, got {t.optimizer!r}.")
        if t.blocks_to_swap < 0:
            raise bad(f"train.blocks_to_swap must be >= 0, got {t.blocks_to_swap}.")
        if t.activation_offload and not t.gradient_checkpointing:
            raise bad("train.activation_offload moves the checkpointed block inputs: it needs "
                      "train.gradient_checkpointing: true.")

    def _check_validation(self, bad: Callable[[str], InputError]) -> None:
        v = self.validation
        for i, p in enumerate(v.prompts):
            if not isinstance(p, dict) or not isinstance(p.get("prompt"), str) or set(p) - {"prompt", "references"}:
                raise bad(f"validation.prompts[{i}] must be {{prompt: TEXT, references: [IMAGES]}}, got {p!r}.")
            if not isinstance(p.get("references", []), list) or not p.get("references"):
                raise bad(f"validation.prompts[{i}].references needs 1-4 image paths.")
        if v.holdout < 0 or v.loss_every < 0 or v.every < 0:
            raise bad("validation.every, validation.holdout and validation.loss_every must be >= 0.")
        # the preview's settings: the generation settings' one validator (what GenerationSettings will check)
        for name, setting in (("width", "width"), ("height", "height"), ("num_frames", "num_frames"),
                              ("steps", "steps"), ("guidance", "guidance"), ("shift", "shift"),
                              ("sampler", "sampler"), ("seed", "seed")):
            value = getattr(v, name)
            if value is not None:
                try:
                    setattr(v, name, check_setting(setting, value))
                except InputError as e:
                    raise bad(f"validation.{name}: {e}") from None
        if v.every or v.prompts:  # the previews play at data.fps (rounded): a rate the video writer takes
            try:
                check_setting("fps", round(self.data.fps))
            except InputError as e:
                raise bad(f"data.fps {self.data.fps} for the validation previews: {e}") from None

    def _check_steps(self, bad: Callable[[str], InputError]) -> None:
        t = self.train
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps"):
            if getattr(t, name) < 1:
                raise bad(f"train.{name} must be at least 1, got {getattr(t, name)}.")
        if t.learning_rate <= 0:
            raise bad(f"train.learning_rate must be positive, got {t.learning_rate}.")


FRAME_SAMPLING = ("head", "uniform", "chunk")
LORA_INITS = ("default", "gaussian")
# diffusers.optimization.SchedulerType's values (get_scheduler's names), listed without importing diffusers
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "piecewise_constant")
OPTIMIZERS = ("adamw", "adamw8bit")

DTYPES = (*C.DTYPE_NAMES, *C.DTYPE_ALIASES)  # bf16 or bfloat16, ...: bindweave_core.dtypes.torch_dtype reads both
# fp8_fast multiplies in fp8 (torch._scaled_mm), which has no backward pass: LoRA training cannot use it.
WEIGHT_FORMATS = tuple(f for f in C.DIT_WEIGHT_FORMATS if f != "fp8_fast")


def _one_of(choices: tuple[str, ...]) -> str:
    """``("a", "b", "c")`` -> ``"a, b or c"`` (the error messages' spelling of a choice)."""
    return f"{', '.join(choices[:-1])} or {choices[-1]}" if len(choices) > 1 else choices[0]


_SECTIONS: dict[str, type] = {f.name: f.default_factory().__class__ for f in dataclasses.fields(TrainConfig)}


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise InputError(f"{where}: expected a mapping, got {type(raw).__name__}.")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise InputError(f"{where}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(names))}.")
    return cls(**{k: _coerce(v, hints[k], f"{where}.{k}") for k, v in raw.items()})


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """YAML values to the field's type (PyYAML reads ``1e-4`` as a string, for instance)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            raise ValueError
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if not math.isfinite(number):
                raise InputError(f"{where}: {value!r} is not a finite number.")
            return number
        if hint is str:
            if isinstance(value, bool):  # YAML 1.1 reads no/off as False and yes/on as True
                return "no" if value is False else "yes"
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
        if origin is list:
            if args and args[0] is int and isinstance(value, int) and not isinstance(value, bool):
                value = [value]  # one number where a list of numbers is allowed (data.num_frames: 81)
            if not isinstance(value, (list, tuple)):
                raise ValueError
            return [_coerce(v, args[0], where) for v in value] if args else list(value)
    except InputError:
        raise
    except (TypeError, ValueError):
        raise InputError(f"{where}: {value!r} is not a valid {getattr(hint, '__name__', hint)}.") from None
    return value


def apply_override(raw: dict[str, Any], item: str) -> None:
    """``section.key=value`` (value parsed as YAML) into the raw config mapping."""
    import yaml

    key, sep, value = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2:
        raise InputError(f"--set takes section.key=value, got {item!r}.")
    section = raw.setdefault(parts[0], {})
    if not isinstance(section, dict):
        raise InputError(f"--set {item!r}: section {parts[0]!r} is not a mapping in the config.")
    section[parts[1]] = yaml.safe_load(value)

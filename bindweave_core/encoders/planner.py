"""The Qwen2.5-VL-7B-Instruct "planner": prompt + reference images -> hidden states (spec section 2).

BindWeave conditions its DiT on the final, normed hidden states of Qwen2.5-VL-7B-Instruct for the
whole chat-templated sequence (system prompt, user text, vision tokens, generation prompt). This
module builds that sequence exactly as the official feature extraction did, runs one forward pass
of the transformers model (no generation) and returns ``[1, L, 3584]``.

Input path, step by step (each step is what makes the pixel values match the official path):

1. ``pre_resize``: the image is converted to RGB, then scaled by 0.75 (<= 1280*720 pixels) or 0.3
   with PIL's default resampling, sizes truncated with ``int()``.
2. ``fit_to_grid``: the official code then ran qwen_vl_utils' ``fetch_image``, which resizes to a
   multiple of 28 within ``[min_pixels, max_pixels]`` with PIL's default (bicubic) resize. The
   transformers image processor applies its own ``smart_resize`` afterwards; on an image already on
   the grid that is the identity. For ordinary images, skipping step 2 and letting the processor
   resize gives bit-identical pixel values (checked on the six OpenS2V images). The two rules differ
   only for images with a side under 14 pixels (qwen_vl_utils rounds each side up to at least 28
   first, transformers does not: a 7x225 image becomes 28x224 officially, 28x336 in transformers),
   so we run the official rule explicitly and the processor's resize never changes anything.
3. The processor (``Qwen2VLImageProcessorPil``, the torchvision-free class of transformers 5;
   ``Qwen2VLImageProcessor`` on 4.x) rescales, normalises with the CLIP mean/std and patchifies; the
   ``Qwen2_5_VLProcessor`` expands each ``<|image_pad|>`` to ``grid_h*grid_w/4`` tokens.

Outputs are returned on the model's device, in the model's dtype (bf16 by default), ``[1, L, D]``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from .. import constants as C
from ..checkpoints.identify import describe, identify
from ..checkpoints.materialize import ScannedCheckpoint, materialize, split_scales
from ..checkpoints.safetensors_io import TensorInfo, read_header
from ..conditioning import PlannerStates
from ..config import PRESETS
from ..errors import CheckpointError, InputError
from ..model_files import where_to_get

log = logging.getLogger("BindWeave")

# ------------------------------------------------------------------------------------ the real model
# Qwen/Qwen2.5-VL-7B-Instruct config.json (flat layout, as released), so no download is needed.
QWEN25_VL_7B_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "hidden_act": "silu",
    "hidden_size": C.PLANNER_DIM,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "max_position_embeddings": 128000,
    "max_window_layers": 28,
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "sliding_window": 32768,
    "use_sliding_window": False,
    "tie_word_embeddings": False,
    "use_cache": True,
    "vocab_size": 152064,
    "vision_config": {
        "depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
        "in_chans": 3, "out_hidden_size": C.PLANNER_DIM, "patch_size": 14, "spatial_merge_size": 2,
        "spatial_patch_size": 14, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2, "temporal_patch_size": 2,
    },
}

# A tiny random Qwen2.5-VL for tests and the smoke pipeline: same classes, toy widths. Its hidden
# size is the tiny DiT's planner width. Token ids point into the tiny in-memory tokenizer below.
_TINY_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                        "<|image_pad|>", "<|video_pad|>")
_TINY_BYTES = 256  # byte-level alphabet first, special tokens after it
TINY_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "bos_token_id": _TINY_BYTES + 0,
    "eos_token_id": _TINY_BYTES + 2,
    "pad_token_id": _TINY_BYTES + 0,
    "vision_start_token_id": _TINY_BYTES + 3,
    "vision_end_token_id": _TINY_BYTES + 4,
    "image_token_id": _TINY_BYTES + 5,
    "video_token_id": _TINY_BYTES + 6,
    "hidden_act": "silu",
    "hidden_size": PRESETS["tiny"].planner_dim,
    "intermediate_size": 128,
    "max_position_embeddings": 4096,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},  # sums to head_dim / 2 = 8
    "use_sliding_window": False,
    "tie_word_embeddings": False,
    "vocab_size": 264,
    "vision_config": {
        "depth": 2, "hidden_act": "silu", "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
        "in_chans": 3, "out_hidden_size": PRESETS["tiny"].planner_dim, "patch_size": 14, "spatial_merge_size": 2,
        "window_size": 112, "fullatt_block_indexes": [1], "tokens_per_second": 2, "temporal_patch_size": 2,
    },
}

# ------------------------------------------------------------------------------------ chat template
SYSTEM_PROMPT = "You are a helpful assistant."  # the Qwen2.5-VL chat template's default
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
_RESERVED_IN_PROMPT = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_pad|>")
# qwen_vl_utils refuses images more elongated than this; so do we (with a clearer error).
MAX_ASPECT_RATIO = 200


def chat_text(prompt: str, num_images: int) -> str:
    """Spec section 2 template: system prompt, one user turn (text, then the images), generation prompt."""
    return ("<|im_start|>system\n" + SYSTEM_PROMPT + "<|im_end|>\n<|im_start|>user\n" + prompt
            + IMAGE_PLACEHOLDER * num_images + "<|im_end|>\n<|im_start|>assistant\n")


# Our own wording for the optional prompt rewrite (behaviour of the official refinement step: one
# continuous scene, subjects as in the references, explicit motion, English, the prompt only).
REFINE_INSTRUCTION = (
    "Turn the short video idea below into a prompt for a video generation model.\n"
    "The attached reference images show the subjects that must appear in the video.\n"
    "Write one paragraph describing a single continuous shot in one place: no split screen, no collage, "
    "no cuts, and each subject appears exactly once.\n"
    "Describe every subject with the visible details of its reference image (appearance, clothing, colours), "
    "where it is in the frame and how it fits into the surroundings, with natural lighting.\n"
    "Say clearly what each subject does and how it moves, using concrete verbs; a simple camera movement "
    "may be added.\n"
    "Keep everything the idea asks for and add no other main subjects.\n"
    "Reply in English with the paragraph only.\n\n"
    "Video idea: {prompt}\n"
    "Reference images:"
)


# ------------------------------------------------------------------------------------ images
@dataclass(frozen=True)
class ImageSettings:
    """The image processor settings that decide the vision grid (a model's ``preprocessor_config.json``)."""

    min_pixels: int = 3136
    max_pixels: int = 12845056
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = C.CLIP_MEAN
    image_std: tuple[float, ...] = C.CLIP_STD
    resample: int = int(Image.Resampling.BICUBIC)

    @property
    def factor(self) -> int:
        """Side multiple of the resized image (one merged vision token covers factor x factor pixels)."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_preprocessor_config(cls, cfg: dict[str, Any]) -> ImageSettings:
        size = cfg.get("size") or {}
        defaults = cls()
        return cls(
            min_pixels=int(cfg.get("min_pixels") or size.get("shortest_edge") or size.get("min_pixels")
                           or defaults.min_pixels),
            max_pixels=int(cfg.get("max_pixels") or size.get("longest_edge") or size.get("max_pixels")
                           or defaults.max_pixels),
            patch_size=int(cfg.get("patch_size", defaults.patch_size)),
            temporal_patch_size=int(cfg.get("temporal_patch_size", defaults.temporal_patch_size)),
            merge_size=int(cfg.get("merge_size", defaults.merge_size)),
            image_mean=tuple(float(v) for v in cfg.get("image_mean", defaults.image_mean)),
            image_std=tuple(float(v) for v in cfg.get("image_std", defaults.image_std)),
            resample=int(cfg.get("resample", defaults.resample)),
        )


# Qwen/Qwen2.5-VL-7B-Instruct preprocessor_config.json (not transformers' generic defaults, which cap
# images at 1,003,520 pixels).
QWEN25_VL_7B_IMAGE_SETTINGS = ImageSettings()


def _as_rgb(image: Any) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise InputError(f"planner reference images must be PIL images, got {type(image).__name__}. "
                         "Convert tensors or arrays to PIL.Image first.")
    # Official behaviour: Image.convert('RGB') (an alpha channel is dropped, not composited); 16-bit and
    # float modes are scaled to 8 bits first (bindweave_core.images), where PIL's convert would clip them.
    from ..images import load_rgb

    return load_rgb(image)


def pre_resize(image: Image.Image) -> Image.Image:
    """Spec section 2: RGB, then scale by 0.75 (<= 1280*720 pixels) or 0.3, PIL's default resampling."""
    image = _as_rgb(image)
    w, h = image.size
    scale = C.PLANNER_SMALL_IMAGE_SCALE if w * h <= C.PLANNER_SMALL_IMAGE_PIXELS else C.PLANNER_LARGE_IMAGE_SCALE
    size = (int(w * scale), int(h * scale))
    if min(size) < 1:
        raise InputError(f"a {w}x{h} reference image is too small for the planner (it becomes {size[0]}x{size[1]} "
                         "after the planner's resize). Use a larger image.")
    return image.resize(size)  # no resample argument, as in the official code


def grid_size(width: int, height: int, settings: ImageSettings = QWEN25_VL_7B_IMAGE_SETTINGS) -> tuple[int, int]:
    """``(width, height)`` the official ``fetch_image`` resizes to: multiples of ``settings.factor``,
    area within ``[min_pixels, max_pixels]``, aspect ratio kept as well as possible.

    Each side is first rounded to the nearest multiple (at least one multiple); an area above the
    maximum is scaled down with floor rounding, an area below the minimum scaled up with ceil rounding.
    """
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise InputError(f"a {width}x{height} reference image is too elongated for Qwen2.5-VL (aspect ratio above "
                         f"{MAX_ASPECT_RATIO}). Crop it closer to the subject.")
    f = settings.factor
    w_bar = max(f, round(width / f) * f)
    h_bar = max(f, round(height / f) * f)
    if w_bar * h_bar > settings.max_pixels:
        beta = math.sqrt(width * height / settings.max_pixels)
        w_bar = math.floor(width / beta / f) * f
        h_bar = math.floor(height / beta / f) * f
    elif w_bar * h_bar < settings.min_pixels:
        beta = math.sqrt(settings.min_pixels / (width * height))
        w_bar = math.ceil(width * beta / f) * f
        h_bar = math.ceil(height * beta / f) * f
    return w_bar, h_bar


def fit_to_grid(image: Image.Image, settings: ImageSettings = QWEN25_VL_7B_IMAGE_SETTINGS) -> Image.Image:
    """The official ``fetch_image`` resize (PIL default resampling) to ``grid_size``."""
    size = grid_size(*image.size, settings)
    return image if size == image.size else image.resize(size)


def prepare_images(images: Any, settings: ImageSettings = QWEN25_VL_7B_IMAGE_SETTINGS) -> list[Image.Image]:
    """Validate 1..4 reference images and apply the planner's resizes (pre-resize, grid fit)."""
    images = check_images(images)
    return [fit_to_grid(pre_resize(im), settings) for im in images]


def check_images(images: Any) -> list[Image.Image]:
    if isinstance(images, Image.Image):
        images = [images]
    if images is None or isinstance(images, (str, bytes)) or not isinstance(images, Sequence):
        raise InputError("the planner needs a list of 1 to 4 PIL reference images.")
    images = list(images)
    if not images:
        raise InputError(f"no reference image given; the planner takes 1 to {C.MAX_REFERENCES}.")
    if len(images) > C.MAX_REFERENCES:
        raise InputError(f"{len(images)} reference images given; BindWeave takes at most {C.MAX_REFERENCES} "
                         f"(it was trained with up to {C.MAX_REFERENCES}). Remove {len(images) - C.MAX_REFERENCES}.")
    return [_as_rgb(im) for im in images]


def check_prompt(prompt: Any, what: str = "prompt", allow_empty: bool = False) -> str:
    if not isinstance(prompt, str):
        raise InputError(f"the {what} must be a string, got {type(prompt).__name__}.")
    if not allow_empty and not prompt.strip():
        raise InputError(f"the {what} is empty; describe the video to generate.")
    reserved = [t for t in _RESERVED_IN_PROMPT if t in prompt]
    if reserved:
        raise InputError(f"the {what} contains Qwen vision tokens ({', '.join(reserved)}); remove them: images are "
                         "given as reference images, not in the text.")
    return prompt


# ------------------------------------------------------------------------------------ processor
def _image_processor_class():
    try:  # transformers 5: the PIL/NumPy twin of the torchvision processor
        from transformers import Qwen2VLImageProcessorPil as cls
    except ImportError:  # transformers 4.x: the plain class is the PIL-based one
        from transformers import Qwen2VLImageProcessor as cls
    return cls


def make_image_processor(settings: ImageSettings = QWEN25_VL_7B_IMAGE_SETTINGS):
    return _image_processor_class()(
        min_pixels=settings.min_pixels, max_pixels=settings.max_pixels, patch_size=settings.patch_size,
        temporal_patch_size=settings.temporal_patch_size, merge_size=settings.merge_size,
        image_mean=list(settings.image_mean), image_std=list(settings.image_std), resample=settings.resample)


def _processor_class():
    from transformers import Qwen2_5_VLProcessor

    class PlannerProcessor(Qwen2_5_VLProcessor):
        """``Qwen2_5_VLProcessor`` without a video processor (the planner takes no video, and the video
        processor class needs torchvision, which CPU installs lack)."""

        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return PlannerProcessor


def make_processor(tokenizer: Any, settings: ImageSettings = QWEN25_VL_7B_IMAGE_SETTINGS):
    """A ``Qwen2_5_VLProcessor`` for ``tokenizer`` with the given image settings."""
    return _processor_class()(image_processor=make_image_processor(settings), tokenizer=tokenizer)


def build_inputs(processor: Any, prompt: str, images: list[Image.Image]):
    """The processor's ``BatchFeature`` for ``prompt`` and already prepared images (``prepare_images``)."""
    return processor(text=[chat_text(prompt, len(images))], images=images, return_tensors="pt")


# ------------------------------------------------------------------------------------ tokenizers
def tiny_tokenizer():
    """A byte-level tokenizer (256 bytes + the Qwen special tokens), built in memory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({tok: _TINY_BYTES + i for i, tok in enumerate(_TINY_SPECIAL_TOKENS)})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(_TINY_SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def _is_tokenizer_dir(d: Path) -> bool:
    return d.is_dir() and ((d / "tokenizer.json").exists() or ((d / "vocab.json").exists()
                                                             and (d / "merges.txt").exists()))


def _tokenizer_candidates(weights: Path) -> list[Path]:
    """Where a single-file planner's tokenizer may be: beside the file, or inside a ComfyUI install."""
    folder = weights.parent
    out = [folder / "qwen25_tokenizer", folder / "qwen2.5_tokenizer", folder / weights.stem, folder]
    with contextlib.suppress(ImportError, ValueError, AttributeError):
        spec = importlib.util.find_spec("comfy")
        if spec is not None and spec.origin:
            out.append(Path(spec.origin).parent / "text_encoders" / "qwen25_tokenizer")
    return out


_TOKENIZER_HELP = ("a folder with the Qwen2.5 tokenizer (vocab.json, merges.txt, tokenizer_config.json): ComfyUI "
                   "ships it as comfy/text_encoders/qwen25_tokenizer/ inside the ComfyUI installation, and the "
                   "tokenizer files of https://huggingface.co/Qwen/Qwen2.5-VL-7B-Instruct work too")


def _load_tokenizer(directory: Path):
    from transformers import AutoTokenizer

    if not _is_tokenizer_dir(directory):
        raise CheckpointError(f"{directory}: no tokenizer here (expected tokenizer.json, or vocab.json + merges.txt "
                              f"+ tokenizer_config.json). Point at {_TOKENIZER_HELP}.")
    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{directory}: the tokenizer files cannot be read ({e}). Use {_TOKENIZER_HELP}.") from e


def _check_tokenizer(tokenizer: Any, config: Any, where: Path | str) -> None:
    expected = {"<|image_pad|>": config.image_token_id, "<|video_pad|>": config.video_token_id,
                "<|vision_start|>": config.vision_start_token_id, "<|vision_end|>": config.vision_end_token_id}
    wrong = {t: (tokenizer.convert_tokens_to_ids(t), i) for t, i in expected.items()
             if tokenizer.convert_tokens_to_ids(t) != i}
    if wrong:
        detail = ", ".join(f"{t} is {got}, the model expects {want}" for t, (got, want) in wrong.items())
        raise CheckpointError(f"{where}: this tokenizer does not belong to the Qwen2.5-VL model ({detail}). "
                              f"Use {_TOKENIZER_HELP}.")


# ------------------------------------------------------------------------------------ checkpoints
PLANNER_CONFIG_METADATA_KEY = "bindweave_planner_config"  # optional JSON config inside our own files
WEIGHT_FORMATS = C.ENCODER_WEIGHT_FORMATS
LM_HEAD_KEY = "lm_head.weight"
FP8_MODULE_PREFIX = "model.language_model.layers."  # decoder linears; embeddings, norms, vision stay
_WRAPPER_MARKERS = ("model.language_model.layers.0.", "model.layers.0.", "visual.blocks.0.")


def _wrapper_prefix(keys: list[str]) -> str:
    """Anything in front of the model's own names (e.g. ComfyUI's ``qwen25_7b.transformer.``)."""
    for marker in _WRAPPER_MARKERS:
        for k in keys:
            i = k.find(marker)
            if i >= 0 and (i == 0 or k[i - 1] == "."):
                return k[:i]
    return ""


def _module_key(key: str) -> str | None:
    """transformers (>= 4.52) module key for a stored key in any Qwen2.5-VL naming, else None.

    Hugging Face shards and ComfyUI's single files store ``model.layers.*``, ``model.embed_tokens``,
    ``model.norm``, ``visual.*`` and ``lm_head.weight``; newer saves already use ``model.language_model.*``
    and ``model.visual.*``.
    """
    for old, new in (("model.language_model.", "model.language_model."), ("model.visual.", "model.visual."),
                     ("visual.", "model.visual."), ("model.lm_head.", "lm_head."), ("lm_head.", "lm_head."),
                     ("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                     ("model.", "model.language_model.")):
        if key.startswith(old):
            return new + key[len(old):]
    if key.rpartition(".")[2] == "scaled_fp8":
        return key  # ComfyUI's fp8 marker tensor, dropped by split_scales
    return None


def _config_object(config: dict[str, Any]):
    from transformers import Qwen2_5_VLConfig

    try:
        return Qwen2_5_VLConfig(**{k: v for k, v in config.items() if k not in ("transformers_version",)})
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"not a usable Qwen2.5-VL configuration ({e}). Use the config.json of "
                              "https://huggingface.co/Qwen/Qwen2.5-VL-7B-Instruct.") from e


def _empty_model(config: Any):
    """The model with parameters on the meta device; the rotary buffers are computed for real."""
    from accelerate import init_empty_weights
    from transformers import Qwen2_5_VLForConditionalGeneration

    with init_empty_weights(include_buffers=False):
        return Qwen2_5_VLForConditionalGeneration(config)


_EXPECTED_CACHE: dict[str, dict[str, tuple[int, ...]]] = {}


def _expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    key = json.dumps(config, sort_keys=True)
    if key not in _EXPECTED_CACHE:
        model = _empty_model(_config_object(config))
        _EXPECTED_CACHE[key] = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return _EXPECTED_CACHE[key]


@dataclass
class PlannerCheckpoint(ScannedCheckpoint):
    """What a Qwen2.5-VL checkpoint holds, from its headers (nothing loaded)."""

    path: Path
    layout: str  # hf-directory | single-file
    key_style: str  # hf (model.layers / visual) | transformers-v5 (model.language_model / model.visual)
    prefix: str
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    scales: dict[str, TensorInfo]
    ignored: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def has_lm_head(self) -> bool:
        return LM_HEAD_KEY in self.tensors


def _directory_config(path: Path) -> dict[str, Any]:
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(
            f"{path}: config.json is missing. A Qwen2.5-VL directory needs the whole Qwen/Qwen2.5-VL-7B-Instruct "
            "download: config.json, preprocessor_config.json, the tokenizer files and "
            "model-0000x-of-00005.safetensors with model.safetensors.index.json. " + where_to_get("planner"))
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cfg_file}: unreadable ({e}); download it again.") from e
    if cfg.get("model_type") != "qwen2_5_vl":
        raise CheckpointError(f"{cfg_file}: model_type is {cfg.get('model_type')!r}, not 'qwen2_5_vl': this directory "
                              "holds another model. " + where_to_get("planner"))
    return cfg


def scan_planner(path: str | os.PathLike, config: dict[str, Any] | None = None, *,
                 infos: dict[str, TensorInfo] | None = None, metadata: dict[str, str] | None = None) -> PlannerCheckpoint:
    """Read a Qwen2.5-VL checkpoint's headers: layout, config, fp8 scales and key/shape problems.

    The config comes from ``config`` if given, else the directory's config.json, else our own files'
    ``bindweave_planner_config`` metadata, else the released 7B model.
    """
    path = Path(path)
    if infos is None:
        try:
            infos, metadata = read_header(path)
        except CheckpointError as e:
            raise CheckpointError(f"{e} {where_to_get('planner')}") from e
    metadata = metadata or {}
    keys = list(infos)
    sig = identify(keys)
    if sig is None or sig.kind != "qwen2.5-vl":
        raise CheckpointError(
            f"{path}: this is not a Qwen2.5-VL model; it looks like {describe(keys)}. "
            + where_to_get("planner"))
    if config is None:
        if path.is_dir():
            config = _directory_config(path)
        elif PLANNER_CONFIG_METADATA_KEY in metadata:
            config = json.loads(metadata[PLANNER_CONFIG_METADATA_KEY])
        else:
            config = QWEN25_VL_7B_CONFIG
    prefix = _wrapper_prefix(keys)
    mapping: dict[str, str] = {}
    foreign: list[str] = []
    for k in keys:
        new = _module_key(k.removeprefix(prefix))  # markers may sit outside the wrapper
        if new is None:
            foreign.append(k)
        else:
            mapping[new] = k
    tensors, scales, ignored = split_scales(mapping, infos)
    expected = _expected_shapes(config)
    ckpt = PlannerCheckpoint(
        path=path, layout="hf-directory" if path.is_dir() else "single-file",
        key_style="transformers-v5" if any(k[len(prefix):].startswith("model.language_model.") for k in keys) else "hf",
        prefix=prefix, config=config, tensors=tensors, scales=scales, ignored=ignored, metadata=metadata)
    ckpt.compare_keys(expected, foreign, optional=(LM_HEAD_KEY,))
    return ckpt


def _check_loadable(ckpt: PlannerCheckpoint) -> None:
    hint = ""
    embed = ckpt.tensors.get("model.language_model.embed_tokens.weight")
    want = ckpt.config.get("hidden_size")
    if embed is not None and len(embed.shape) == 2 and embed.shape[1] != want:
        hint = (f"Its hidden size is {embed.shape[1]}, the expected model's is {want}: this is another Qwen2.5-VL "
                "size; BindWeave needs Qwen2.5-VL-7B-Instruct.")
    ckpt.require_matching_keys("Qwen2.5-VL", "planner", hint)


class _MissingLMHead(nn.Module):
    """Stands in for ``lm_head`` when the file has none: encoding works, generation says why it cannot."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        raise CheckpointError("this planner file has no LM head (lm_head.weight), so it cannot generate text. Prompt "
                              "refinement needs a file with the LM head, e.g. the Qwen/Qwen2.5-VL-7B-Instruct "
                              "directory or ComfyUI's qwen_2.5_vl_7b.safetensors.")


def _file_identity(files: list[Path]) -> list[list[Any]]:
    out = []
    for f in files:
        st = f.stat()
        out.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    return out


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# ------------------------------------------------------------------------------------ the planner
class Planner:
    """Qwen2.5-VL (``transformers.Qwen2_5_VLForConditionalGeneration``) + its processor.

    ``model`` is a plain ``nn.Module``: move it with ``planner.model.to(device)``; inputs follow it.
    Results come back on the model's device in the model's dtype.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, image_settings: ImageSettings = QWEN25_VL_7B_IMAGE_SETTINGS,
                 *, identity: str, source: str = "", has_lm_head: bool = True) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_settings = image_settings
        self.processor = make_processor(tokenizer, image_settings)
        self.identity = identity  # stable id of the weights + tokenizer + settings, for the disk cache
        self.source = source
        self.has_lm_head = has_lm_head
        _check_tokenizer(tokenizer, model.config, source or "tokenizer")

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.model.language_model.norm.weight.dtype

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.text_config.hidden_size)

    def __repr__(self) -> str:
        return (f"Planner(hidden_size={self.hidden_size}, dtype={self.dtype}, device={self.device}, "
                f"source={self.source!r})")

    # ------------------------------------------------------------------ construction
    @classmethod
    def load(cls, path: str | os.PathLike, *, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
             tokenizer_dir: str | os.PathLike | None = None, weight_format: str = "default",
             config: dict[str, Any] | None = None) -> Planner:
        """Load Qwen2.5-VL from a Hugging Face directory or a single file (ComfyUI's ``qwen_2.5_vl_7b*``).

        Args:
            dtype: compute dtype every floating tensor is cast to (fp8 files are dequantised to it).
            tokenizer_dir: the Qwen2.5 tokenizer folder; needed for single files (looked for beside the
                file and in an importable ComfyUI install otherwise). A directory uses its own.
            weight_format: ``default``, or ``fp8`` to keep the decoder's linear weights as fp8 e4m3
                storage with per-tensor scales (quantising high-precision files on the way in).
            config: a Qwen2.5-VL config dict for files that are not the released 7B model.
        """
        from ..dit.fp8 import swap_in_fp8_linears

        if weight_format not in WEIGHT_FORMATS:
            raise ValueError(f"weight_format must be one of {WEIGHT_FORMATS}, got {weight_format!r}")
        path = Path(path)
        if not path.exists():
            raise CheckpointError(f"{path}: no such file or directory. " + where_to_get("planner"))
        ckpt = scan_planner(path, config)
        _check_loadable(ckpt)
        cfg = _config_object(ckpt.config)

        if path.is_dir():
            tok_dir = Path(tokenizer_dir) if tokenizer_dir is not None else path
            pre = path / "preprocessor_config.json"
            if pre.exists():
                try:
                    settings = ImageSettings.from_preprocessor_config(json.loads(pre.read_text()))
                except (OSError, ValueError, TypeError) as e:
                    raise CheckpointError(f"{pre}: unreadable ({e}); download it again from "
                                          "https://huggingface.co/Qwen/Qwen2.5-VL-7B-Instruct.") from e
            else:
                log.warning("%s has no preprocessor_config.json; using Qwen2.5-VL-7B-Instruct's image settings", path)
                settings = QWEN25_VL_7B_IMAGE_SETTINGS
        else:
            settings = QWEN25_VL_7B_IMAGE_SETTINGS
            if tokenizer_dir is not None:
                tok_dir = Path(tokenizer_dir)
            else:
                candidates = _tokenizer_candidates(path)
                tok_dir = next((d for d in candidates if _is_tokenizer_dir(d)), None)
                if tok_dir is None:
                    raise CheckpointError(
                        f"{path}: a single-file Qwen2.5-VL checkpoint carries no tokenizer. Pass tokenizer_dir= "
                        f"{_TOKENIZER_HELP}. Looked in: {', '.join(str(d) for d in candidates)}.")
        tokenizer = _load_tokenizer(tok_dir)
        _check_tokenizer(tokenizer, cfg, tok_dir)

        model = _empty_model(cfg)
        if not ckpt.has_lm_head:
            log.info("%s has no lm_head: encoding works, prompt refinement does not", path)
            model.lm_head = _MissingLMHead()
        fp8_modules: set[str] = set()
        if weight_format == "fp8":
            fp8_modules = {n for n, m in model.named_modules() if type(m) is nn.Linear and n.startswith(FP8_MODULE_PREFIX)}
            swap_in_fp8_linears(model, sorted(fp8_modules))
        materialize(model, ckpt.tensors, scales=ckpt.scales, dtype=dtype, device=device, fp8_modules=fp8_modules,
                    strict=True, source=path)
        model.to(device)  # the rotary buffers were made on the CPU
        identity = _hash({"files": _file_identity(ckpt.files), "tokenizer": str(tok_dir.resolve()),
                          "settings": settings.__dict__, "dtype": str(dtype), "weight_format": weight_format,
                          "config": ckpt.config})
        log.info("loaded Qwen2.5-VL planner (%s, %s%s) from %s", ckpt.layout,
                 "fp8 decoder weights" if fp8_modules else str(dtype).replace("torch.", ""),
                 ", fp8-scaled file" if ckpt.fp8_scaled else "", path)
        planner = cls(model, tokenizer, settings, identity=identity, source=str(path), has_lm_head=ckpt.has_lm_head)
        planner.checkpoint_info = ckpt
        return planner

    @classmethod
    def tiny(cls, seed: int = 0) -> Planner:
        """A tiny random Qwen2.5-VL (hidden 64, 2 layers, 2-layer vision tower) with an in-memory tokenizer."""
        from transformers import Qwen2_5_VLForConditionalGeneration

        with torch.random.fork_rng(devices=[]):  # the classes' own init draws from the global RNG
            torch.manual_seed(seed)
            model = Qwen2_5_VLForConditionalGeneration(_config_object(TINY_CONFIG))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in sorted(model.named_parameters()):
                if p.dim() == 1 and "norm" in name or name.endswith("ln_q.weight"):
                    p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))  # RMSNorm gains near 1
                else:
                    fan_in = math.prod(p.shape[1:]) if p.dim() > 1 else p.shape[0]
                    p.copy_(torch.randn(p.shape, generator=g) * fan_in ** -0.5)
        identity = _hash({"tiny": seed, "config": TINY_CONFIG, "settings": QWEN25_VL_7B_IMAGE_SETTINGS.__dict__})
        return cls(model.float(), tiny_tokenizer(), QWEN25_VL_7B_IMAGE_SETTINGS, identity=identity,
                   source=f"tiny(seed={seed})")

    # ------------------------------------------------------------------ inputs
    def prepare_images(self, images: Any) -> list[Image.Image]:
        """1..4 images, pre-resized and fitted to the vision grid (spec section 2)."""
        return prepare_images(images, self.image_settings)

    def input_sequence(self, prompt: str, images: Any, *, prepared: bool = False):
        """The processor's ``BatchFeature`` (``input_ids``, ``attention_mask``, ``pixel_values``,
        ``image_grid_thw``) for ``prompt`` and the reference ``images`` (resized inside unless ``prepared``)."""
        check_prompt(prompt)
        images = check_images(images) if prepared else self.prepare_images(images)
        return build_inputs(self.processor, prompt, images)

    def _model_inputs(self, batch) -> dict[str, Any]:
        return batch.to(self.device, dtype=self.dtype)  # BatchFeature casts floating tensors only

    # ------------------------------------------------------------------ encoding
    @torch.no_grad()  # not inference_mode: the states may feed a trained connector later
    def hidden_states(self, prompt: str, images: Any, *, prepared: bool = False) -> torch.Tensor:
        """``[1, L, hidden]``: the language model's final hidden states after its final RMSNorm, for every
        token of the templated sequence (one forward of vision tower + decoder, no LM head, no generation)."""
        batch = self._model_inputs(self.input_sequence(prompt, images, prepared=prepared))
        out = self.model.model(**batch, use_cache=False, return_dict=True)
        return out.last_hidden_state

    def encode(self, prompt: str, images: Any, negative_prompt: str = C.DEFAULT_PLANNER_NEGATIVE_PROMPT,
               cache: PlannerCache | None = None) -> PlannerStates:
        """Positive and negative planner states; the negative prompt sees the same images (spec sections 2, 3)."""
        check_prompt(prompt)
        check_prompt(negative_prompt, "negative prompt", allow_empty=True)
        tokens = len(self.tokenizer(prompt)["input_ids"])
        if tokens > C.TEXT_LEN:  # UMT5 cuts such a prompt (encoders/text.py warns); say that this branch does not
            log.info("the planner reads the whole prompt: %d tokens (no limit), with the images", tokens)
        originals = check_images(images)
        key = cache.key(self.identity, prompt, negative_prompt, originals) if cache is not None else None
        if cache is not None:
            hit = cache.load(key, device=self.device, dtype=self.dtype)
            if hit is not None:
                return hit
        prepared = self.prepare_images(originals)
        states = PlannerStates(positive=self.hidden_states(prompt, prepared, prepared=True),
                               negative=self.hidden_states(negative_prompt, prepared, prepared=True))
        if cache is not None:
            cache.store(key, states, {"prompt": prompt, "negative_prompt": negative_prompt, "planner": self.source})
        return states

    # ------------------------------------------------------------------ prompt refinement
    @torch.no_grad()
    def refine_prompt(self, prompt: str, images: Any, *, seed: int | None = None, do_sample: bool = False,
                      max_new_tokens: int = 200, temperature: float = 0.7, top_p: float = 0.9,
                      repetition_penalty: float = 1.05) -> str:
        """Rewrite a short prompt into one detailed single-scene description of the subjects and their motion.

        Greedy by default. With ``do_sample`` and a ``seed`` the sampling is reproducible and leaves the
        global RNG as it was. Needs weights with the LM head.
        """
        from transformers import GenerationConfig

        check_prompt(prompt)
        if not self.has_lm_head:
            raise CheckpointError(f"{self.source}: this planner file has no LM head (lm_head.weight), so it cannot "
                                  "rewrite prompts. Prompt refinement needs a file with the LM head, e.g. the "
                                  "Qwen/Qwen2.5-VL-7B-Instruct directory; encoding works without it.")
        prepared = self.prepare_images(images)
        instruction = REFINE_INSTRUCTION.format(prompt=prompt.strip())
        batch = self._model_inputs(build_inputs(self.processor, instruction, prepared))
        tok = self.tokenizer
        stop = [i for i in {tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")}
                if isinstance(i, int) and i >= 0]
        gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=do_sample, eos_token_id=stop,
                               pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
                               repetition_penalty=repetition_penalty,
                               **({"temperature": temperature, "top_p": top_p, "top_k": 0} if do_sample else {}))
        rng = contextlib.nullcontext()
        if do_sample and seed is not None:
            devices = [self.device.index or 0] if self.device.type == "cuda" else []
            rng = torch.random.fork_rng(devices=devices)
        with rng:
            if do_sample and seed is not None:
                torch.manual_seed(seed)
            out = self.model.generate(**batch, generation_config=gen)
        text = tok.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        if not text:
            log.warning("prompt refinement produced no text; keeping the original prompt")
            return prompt
        log.info("refined prompt: %s", text)
        return text


# ------------------------------------------------------------------------------------ disk cache
def image_digest(image: Image.Image) -> str:
    """sha256 of an image's RGB pixels and size (what the planner sees before its resizes)."""
    rgb = _as_rgb(image)
    h = hashlib.sha256(f"{rgb.size[0]}x{rgb.size[1]}:".encode())
    h.update(rgb.tobytes())
    return h.hexdigest()


class PlannerCache:
    """Planner states on disk, one safetensors file per (model, prompt, negative prompt, images)."""

    VERSION = 1  # bump when the planner's preprocessing changes

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)

    def key(self, identity: str, prompt: str, negative_prompt: str, images: list[Image.Image]) -> str:
        return _hash({"v": self.VERSION, "model": identity, "prompt": prompt, "negative_prompt": negative_prompt,
                      "images": [image_digest(im) for im in images]})

    def path(self, key: str) -> Path:
        return self.directory / f"planner-{key[:40]}.safetensors"

    def load(self, key: str, device: str | torch.device | None = None,
             dtype: torch.dtype | None = None) -> PlannerStates | None:
        from safetensors import SafetensorError, safe_open

        p = self.path(key)
        if not p.exists():
            return None
        try:
            with safe_open(str(p), framework="pt") as f:
                if (f.metadata() or {}).get("key") != key:
                    return None
                pos, neg = f.get_tensor("positive"), f.get_tensor("negative")
        except (SafetensorError, OSError, KeyError) as e:
            log.warning("ignoring unreadable planner cache file %s (%s)", p, e)
            return None
        log.info("planner states from cache %s", p.name)
        return PlannerStates(positive=pos.to(device=device, dtype=dtype), negative=neg.to(device=device, dtype=dtype))

    def store(self, key: str, states: PlannerStates, info: dict[str, str] | None = None) -> Path:
        from ..checkpoints.writers import atomic_save_file

        meta = {"key": key, **{k: str(v) for k, v in (info or {}).items()}}
        tensors = {"positive": states.positive.detach().cpu().contiguous(),
                   "negative": states.negative.detach().cpu().contiguous()}
        return atomic_save_file(tensors, self.path(key), metadata=meta)


# ------------------------------------------------------------------------------------ inspect
def _shapes_summary(ckpt: PlannerCheckpoint) -> dict[str, Any]:
    """Architecture numbers read off the stored tensors (they hold whatever the config assumed)."""
    t = ckpt.tensors

    def dim(key: str, axis: int) -> int | None:
        info = t.get(key)
        return info.shape[axis] if info is not None and len(info.shape) > axis else None

    def count(prefix: str) -> int | None:
        idx = {int(k[len(prefix):].split(".")[0]) for k in t if k.startswith(prefix)}
        return max(idx) + 1 if idx else None

    lm = "model.language_model."
    return {"hidden_size": dim(lm + "embed_tokens.weight", 1), "vocab_size": dim(lm + "embed_tokens.weight", 0),
            "num_layers": count(lm + "layers."), "ffn_dim": dim(lm + "layers.0.mlp.gate_proj.weight", 0),
            "kv_dim": dim(lm + "layers.0.self_attn.k_proj.weight", 0),
            "vision_layers": count("model.visual.blocks."), "vision_dim": dim("model.visual.patch_embed.proj.weight", 0)}


def inspect_report(path: Path, infos: dict[str, TensorInfo], metadata: dict[str, str]) -> dict:
    """The Qwen2.5-VL part of ``python -m bindweave_core inspect``."""
    ckpt = scan_planner(path, infos=infos, metadata=metadata)
    cfg = ckpt.config
    summary = {k: v for k, v in _shapes_summary(ckpt).items() if v is not None}
    hidden = summary.get("hidden_size", cfg.get("hidden_size"))
    if hidden == cfg.get("hidden_size"):  # heads come from the config, which matches the file
        summary["num_heads"] = cfg.get("num_attention_heads")
        summary["head_dim"] = hidden // max(1, cfg.get("num_attention_heads", 1))
    summary["planner_dim"] = hidden
    problems = ckpt.problems()
    if hidden != C.PLANNER_DIM:
        problems.append(f"hidden size {hidden}: the BindWeave connector takes {C.PLANNER_DIM} "
                        "(Qwen2.5-VL-7B-Instruct)")
    return {"family": "qwen2.5-vl-7b" if hidden == C.PLANNER_DIM else f"qwen2.5-vl (hidden {hidden})",
            "layout": f"{ckpt.layout} ({ckpt.key_style} key names"
                      + (f", prefix {ckpt.prefix!r}" if ckpt.prefix else "") + ")",
            "fp8_scaled": ckpt.fp8_scaled, "lm_head": ckpt.has_lm_head, "parameters": ckpt.parameter_count,
            "config": summary, "problems": problems, "extras": ckpt.extras()}

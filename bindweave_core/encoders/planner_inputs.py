"""The planner's input: the chat template, the official image resizes and the Qwen2.5-VL processor
(spec section 2; the steps are described in ``encoders.planner``)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from .. import constants as C
from ..errors import InputError
from ..setting_bounds import check_reference_count

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


def as_rgb(image: Any) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise InputError(f"planner reference images must be PIL images, got {type(image).__name__}. "
                         "Convert tensors or arrays to PIL.Image first.")
    # Official behaviour: Image.convert('RGB') (an alpha channel is dropped, not composited); 16-bit and
    # float modes are scaled to 8 bits first (bindweave_core.images), where PIL's convert would clip them.
    from ..images import load_rgb

    return load_rgb(image)


def image_digest(image: Image.Image) -> str:
    """sha256 of an image's RGB pixels and size (what the planner sees before its resizes): the images'
    part of the planner's condition-cache key."""
    rgb = as_rgb(image)
    h = hashlib.sha256(f"{rgb.size[0]}x{rgb.size[1]}:".encode())
    h.update(rgb.tobytes())
    return h.hexdigest()


def pre_resize(image: Image.Image) -> Image.Image:
    """Spec section 2: RGB, then scale by 0.75 (<= 1280*720 pixels) or 0.3, PIL's default resampling."""
    image = as_rgb(image)
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
    check_reference_count(len(images), C.MAX_REFERENCES, "BindWeave")
    return [as_rgb(im) for im in images]


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

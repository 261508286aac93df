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
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from .. import constants as C
from ..checkpoints.in_memory import is_in_memory
from ..checkpoints.materialize import materialize
from ..condition_cache import digest, file_identity
from ..conditioning import PlannerStates
from ..errors import CheckpointError
from ..model_files import where_to_get
from .base import Encoder, seeded_init_
from .planner_checkpoint import (
    FP8_MODULE_PREFIX,
    TOKENIZER_HELP,
    WEIGHT_FORMATS,
    MissingLMHead,
    check_loadable,
    check_tokenizer,
    config_object,
    empty_model,
    inspect_report,
    is_tokenizer_dir,
    load_tokenizer,
    scan_planner,
    tiny_tokenizer,
    tokenizer_candidates,
)
from .planner_config import QWEN25_VL_7B_CONFIG, TINY_CONFIG
from .planner_inputs import (
    QWEN25_VL_7B_IMAGE_SETTINGS,
    REFINE_INSTRUCTION,
    ImageSettings,
    build_inputs,
    chat_text,
    check_images,
    check_prompt,
    fit_to_grid,
    grid_size,
    image_digest,
    make_processor,
    pre_resize,
    prepare_images,
)

log = logging.getLogger("BindWeave")

# The planner's public names, wherever they are defined (callers import them from here).
__all__ = ["Planner", "image_digest", "inspect_report", "scan_planner", "tiny_tokenizer",
           "QWEN25_VL_7B_CONFIG", "TINY_CONFIG", "QWEN25_VL_7B_IMAGE_SETTINGS", "ImageSettings", "build_inputs",
           "chat_text", "check_images", "check_prompt", "fit_to_grid", "grid_size", "make_processor", "pre_resize",
           "prepare_images", "WEIGHT_FORMATS"]

# ------------------------------------------------------------------------------------ the planner
def _tiny_value(name: str, p: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    if p.dim() == 1 and "norm" in name or name.endswith("ln_q.weight"):
        return 1.0 + 0.1 * noise  # RMSNorm gains near 1
    fan_in = math.prod(p.shape[1:]) if p.dim() > 1 else p.shape[0]
    return noise * fan_in ** -0.5


class Planner(Encoder):
    """Qwen2.5-VL (``transformers.Qwen2_5_VLForConditionalGeneration``) + its processor.

    ``model`` is a plain ``nn.Module``: move it with ``planner.model.to(device)``; inputs follow it.
    Results come back on the model's device in the model's dtype.
    """

    inspect_report = staticmethod(inspect_report)

    def __init__(self, model: nn.Module, tokenizer: Any, image_settings: ImageSettings = QWEN25_VL_7B_IMAGE_SETTINGS,
                 *, identity: str, source: str = "", has_lm_head: bool = True) -> None:
        super().__init__(model.eval().requires_grad_(False), source=source)
        self.tokenizer = tokenizer
        self.image_settings = image_settings
        self.processor = make_processor(tokenizer, image_settings)
        self.identity = identity  # stable id of the weights + tokenizer + settings, for the condition cache
        self.has_lm_head = has_lm_head
        check_tokenizer(tokenizer, model.config, source or "tokenizer")

    # ------------------------------------------------------------------ properties
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
        from ..fp8 import swap_in_fp8_linears

        if weight_format not in WEIGHT_FORMATS:
            raise ValueError(f"weight_format must be one of {WEIGHT_FORMATS}, got {weight_format!r}")
        path = Path(path)
        if not path.exists() and not is_in_memory(path):
            raise CheckpointError(f"{path}: no such file or directory. " + where_to_get("planner"))
        ckpt = scan_planner(path, config)
        check_loadable(ckpt)
        cfg = config_object(ckpt.config)

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
                candidates = tokenizer_candidates(path)
                tok_dir = next((d for d in candidates if is_tokenizer_dir(d)), None)
                if tok_dir is None:
                    raise CheckpointError(
                        f"{path}: a single-file Qwen2.5-VL checkpoint carries no tokenizer. Pass tokenizer_dir= "
                        f"{TOKENIZER_HELP}. Looked in: {', '.join(str(d) for d in candidates)}.")
        tokenizer = load_tokenizer(tok_dir)
        check_tokenizer(tokenizer, cfg, tok_dir)

        model = empty_model(cfg)
        if not ckpt.has_lm_head:
            log.info("%s has no lm_head: encoding works, prompt refinement does not", path)
            model.lm_head = MissingLMHead()
        fp8_modules: set[str] = set()
        if weight_format == "fp8":
            fp8_modules = {n for n, m in model.named_modules() if type(m) is nn.Linear and n.startswith(FP8_MODULE_PREFIX)}
            swap_in_fp8_linears(model, sorted(fp8_modules))
        materialize(model, ckpt.tensors, scales=ckpt.scales, dtype=dtype, device=device, fp8_modules=fp8_modules,
                    strict=True, source=path)
        model.to(device)  # the rotary buffers were made on the CPU
        identity = digest({"files": [file_identity(f) for f in ckpt.files], "tokenizer": str(tok_dir.resolve()),
                          "settings": settings.__dict__, "dtype": str(dtype), "weight_format": weight_format,
                          "config": ckpt.config})
        log.info("loaded Qwen2.5-VL planner (%s, %s%s) from %s", ckpt.layout,
                 "fp8 decoder weights" if fp8_modules else str(dtype).replace("torch.", ""),
                 ", fp8-scaled file" if ckpt.fp8_scaled else "", path)
        planner = cls(model, tokenizer, settings, identity=identity, source=str(path), has_lm_head=ckpt.has_lm_head)
        return planner.loaded_from(ckpt)

    @classmethod
    def tiny(cls, seed: int = 0) -> Planner:
        """A tiny random Qwen2.5-VL (hidden 64, 2 layers, 2-layer vision tower) with an in-memory tokenizer."""
        from transformers import Qwen2_5_VLForConditionalGeneration

        with torch.random.fork_rng(devices=[]):  # the classes' own init draws from the global RNG
            torch.manual_seed(seed)
            model = Qwen2_5_VLForConditionalGeneration(config_object(TINY_CONFIG))
        seeded_init_(model, seed, _tiny_value)
        identity = digest({"tiny": seed, "config": TINY_CONFIG, "settings": QWEN25_VL_7B_IMAGE_SETTINGS.__dict__})
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

    def encode(self, prompt: str, images: Any,
               negative_prompt: str = C.DEFAULT_PLANNER_NEGATIVE_PROMPT) -> PlannerStates:
        """Positive and negative planner states; the negative prompt sees the same images (spec sections 2, 3).

        Not cached here: the pipeline keeps the states in its condition cache (``condition_cache.py``).
        """
        check_prompt(prompt)
        check_prompt(negative_prompt, "negative prompt", allow_empty=True)
        tokens = len(self.tokenizer(prompt)["input_ids"])
        if tokens > C.TEXT_LEN:  # UMT5 cuts such a prompt (encoders/text.py warns); say that this branch does not
            log.info("the planner reads the whole prompt: %d tokens (no limit), with the images", tokens)
        prepared = self.prepare_images(check_images(images))
        return PlannerStates(positive=self.hidden_states(prompt, prepared, prepared=True),
                             negative=self.hidden_states(negative_prompt, prepared, prepared=True))

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

"""The four encoders as loaders of their files: nothing is read until a model is first needed.

Used by :meth:`~bindweave_core.pipeline.BindWeavePipeline.from_files` and by the trainer's cache step,
so both load the planner, UMT5, CLIP and the VAE the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .condition_cache import digest, path_identity
from .lazy import Lazy

if TYPE_CHECKING:
    import torch


def file_identity_meta(path: str, dtype: torch.dtype, **extra: Any) -> dict[str, Any]:
    """``Lazy.meta`` naming a model by its files (resolved paths, sizes, mtimes), its dtype and ``extra``:
    the condition cache's identity of a model that is not loaded yet; with its path and dtype (the stages'
    memory check, ``bindweave_core.stage_memory``)."""
    return {"identity": digest({"files": path_identity(path), "dtype": str(dtype), **extra}), "path": str(path),
            "dtype": dtype}


def encoder_loaders(*, vae: str, text_encoder: str, clip_vision: str | None, planner: str | None,
                    planner_tokenizer: str | None, text_tokenizer: str | None,
                    dtype: torch.dtype) -> dict[str, Lazy | None]:
    """``{"vae", "text_encoder", "clip_vision", "planner"}`` as :class:`Lazy` loaders at ``dtype`` (None for
    an encoder not given). Every given path must exist: its files name the model for the caches."""
    from .encoders.clip_vision import ClipVisionEncoder
    from .encoders.planner import Planner
    from .encoders.text import TextEncoder
    from .encoders.vae import WanVAE

    return dict(
        vae=Lazy(lambda: WanVAE.load(vae, dtype=dtype), str(vae), meta=file_identity_meta(vae, dtype)),
        text_encoder=Lazy(lambda: TextEncoder.load(text_encoder, dtype=dtype, tokenizer_dir=text_tokenizer),
                          str(text_encoder), meta=file_identity_meta(text_encoder, dtype, tokenizer=text_tokenizer and
                                                                path_identity(text_tokenizer))),
        clip_vision=Lazy(lambda: ClipVisionEncoder.load(clip_vision, dtype=dtype), str(clip_vision),
                         meta=file_identity_meta(clip_vision, dtype)) if clip_vision else None,
        planner=Lazy(lambda: Planner.load(planner, dtype=dtype, tokenizer_dir=planner_tokenizer), str(planner),
                     meta=file_identity_meta(planner, dtype, tokenizer=planner_tokenizer and path_identity(planner_tokenizer)))
        if planner else None,
    )

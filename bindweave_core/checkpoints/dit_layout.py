"""The key layouts of BindWeave / Wan DiT files, mapped to the diffusers names the DiT uses.

Layouts (detected from the keys):

* ``diffusers``: ``ByteDance/BindWeave`` (sharded ``diffusion_pytorch_model-*.safetensors`` + index,
  connector ``condition_embedder.text_projector.linear_1/2``), or any diffusers Wan transformer;
* ``wan-original``: the original Wan single file (``blocks.N.self_attn.q.weight``, ...), connector as
  ``text_projection.0/.2``, optionally fp8 (e4m3fn) with per-tensor ``scale_weight`` entries (the
  repacked ``*_fp8_scaled*.safetensors`` files ComfyUI users download);
* GGUF single files (ComfyUI-GGUF's Wan repacks, ``models/unet/`` or ``models/diffusion_models/``):
  original Wan names with quantised linear weights; see ``gguf_io.py``;
* ``sat``: SAT training checkpoints (Kaleido-14B-S2V's ``model/`` folder or its
  ``mp_rank_00_model_states.pt``), mapped by ``sat_layout.py``; read as family ``kaleido``.

Only names are mapped here (from headers); ``dit/loading.py`` builds and fills the model.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError
from .identify import describe, identify, strip_wrapper_prefix
from .materialize import split_scales
from .tensor_info import TensorInfo

CONNECTOR_ORIGINAL = {"text_projection.0.": "condition_embedder.text_projector.linear_1.",
                      "text_projection.2.": "condition_embedder.text_projector.linear_2."}


def original_to_diffusers(keys: list[str], prefix: str) -> tuple[dict[str, str], list[str]]:
    """``{diffusers key: stored key}`` for original-layout keys, plus keys it cannot place."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    placeable, foreign = [], []
    for k in keys:
        unplaceable = not k.startswith(prefix) or "motion_encoder" in k or "face_adapter" in k
        (foreign if unplaceable else placeable).append(k)
    stripped = {k[len(prefix):]: k for k in placeable}
    # diffusers' converter only renames keys: feed it key -> key and read the renaming back.
    renamed = convert_wan_transformer_to_diffusers({k: k for k in stripped})
    mapping = {}
    for new, short in renamed.items():
        for old_prefix, new_prefix in CONNECTOR_ORIGINAL.items():
            if new.startswith(old_prefix):
                new = new_prefix + new[len(old_prefix):]
        mapping[new] = stripped[short]
    return mapping, foreign


def _layout_of(keys: list[str], path: Path) -> tuple[str, str]:
    sig = identify(keys)
    if sig is None or sig.kind != "dit":
        raise CheckpointError(
            f"{path}: this is not a BindWeave/Wan DiT; it looks like {describe(keys)}. Load it with the "
            "matching loader, or point this loader at the BindWeave transformer (ByteDance/BindWeave, or a "
            "single file such as Wan2_1-I2V-14B-Bindweave_fp8_scaled_KJ.safetensors).")
    marker = {"wan-original": "blocks.0.", "sat": "mixins.patch_embed."}.get(sig.layout, "patch_embedding.")
    return sig.layout, strip_wrapper_prefix(keys, marker)


def map_dit_keys(infos: dict[str, TensorInfo], path: Path):
    """``(layout, tensors, scales, ignored, foreign)``: the stored tensors under the DiT's module keys,
    their fp8 scales, the harmless extras, and the keys no DiT module takes."""
    keys = list(infos)
    layout, prefix = _layout_of(keys, path)
    if layout == "sat":
        from .sat_layout import map_sat_keys

        tensors, ignored, foreign = map_sat_keys(infos, prefix)
        return layout, tensors, {}, ignored, foreign
    if layout == "wan-original":
        mapping, foreign = original_to_diffusers(keys, prefix)
    else:
        mapping = {k[len(prefix):]: k for k in keys if k.startswith(prefix)}
        foreign = [k for k in keys if not k.startswith(prefix)]
    tensors, scales, ignored = split_scales(mapping, infos)
    return layout, tensors, scales, ignored, foreign

"""The SAT key layout of Wan DiTs (Kaleido-14B-S2V) and where SAT keeps its checkpoint file.

SAT (the training framework of zai-org/Kaleido and CogVideoX) renames Wan's modules and fuses some
projections. The correspondence below is the inverse of the official conversion script
``convert_ckpt_init_wan2sat.py`` (see docs/kaleido-rrope.md for line references):

* ``transformer.layers.N.attention.query_key_value`` is Wan's ``q``, ``k`` and ``v`` stacked along
  the output rows, ``cross_attention.key_value`` is ``k`` and ``v`` stacked; they are read as row
  ranges of the one stored tensor (no copy);
* the per-layer qk-norm gains and modulation tables live in ``mixins.adaln_layer.*_list.N``;
* the head is ``mixins.final_layer``, the patch embedding ``mixins.patch_embed.proj``.

Every SAT name is first turned into Wan's original name and then into diffusers' name with
diffusers' own Wan converter, so there is a single source for the diffusers side.

A SAT checkpoint is a folder (``model/``) holding ``latest`` (the iteration tag) and
``<tag>/mp_rank_00_model_states.pt``: a pickled dict whose ``module`` entry is the state dict with
keys prefixed ``model.diffusion_model.``.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import CheckpointError
from .tensor_info import TensorInfo

SAT_MARKER = "mixins.patch_embed.proj."
SAT_FILES = ("mp_rank_00_model_states.pt", "fsdp2_rank_0000_checkpoint.pt")
# Keys of other models saved in the same SAT state dict (frozen text encoder, VAE): not the DiT's.
SAT_OTHER_PREFIXES = ("conditioner.", "first_stage_model.")

# One stored tensor -> one Wan tensor.
_SINGLE: tuple[tuple[str, str], ...] = (
    (r"mixins\.patch_embed\.proj\.(weight|bias)", r"patch_embedding.\1"),
    (r"text_embedding\.([02])\.(weight|bias)", r"text_embedding.\1.\2"),
    (r"time_embed\.([02])\.(weight|bias)", r"time_embedding.\1.\2"),
    (r"adaln_projection\.1\.(weight|bias)", r"time_projection.1.\1"),
    (r"mixins\.final_layer\.adaLN_modulation", r"head.modulation"),
    (r"mixins\.final_layer\.linear\.(weight|bias)", r"head.head.\1"),
    (r"clip_proj\.proj\.([0134])\.(weight|bias)", r"img_emb.proj.\1.\2"),
    (r"transformer\.layers\.(\d+)\.attention\.dense\.(weight|bias)", r"blocks.\1.self_attn.o.\2"),
    (r"transformer\.layers\.(\d+)\.cross_attention\.query\.(weight|bias)", r"blocks.\1.cross_attn.q.\2"),
    (r"transformer\.layers\.(\d+)\.cross_attention\.dense\.(weight|bias)", r"blocks.\1.cross_attn.o.\2"),
    (r"transformer\.layers\.(\d+)\.post_cross_attention_layernorm\.(weight|bias)", r"blocks.\1.norm3.\2"),
    (r"transformer\.layers\.(\d+)\.mlp\.dense_h_to_4h\.(weight|bias)", r"blocks.\1.ffn.0.\2"),
    (r"transformer\.layers\.(\d+)\.mlp\.dense_4h_to_h\.(weight|bias)", r"blocks.\1.ffn.2.\2"),
    (r"mixins\.adaln_layer\.query_layernorm_list\.(\d+)\.weight", r"blocks.\1.self_attn.norm_q.weight"),
    (r"mixins\.adaln_layer\.key_layernorm_list\.(\d+)\.weight", r"blocks.\1.self_attn.norm_k.weight"),
    (r"mixins\.adaln_layer\.cross_query_layernorm_list\.(\d+)\.weight", r"blocks.\1.cross_attn.norm_q.weight"),
    (r"mixins\.adaln_layer\.cross_key_layernorm_list\.(\d+)\.weight", r"blocks.\1.cross_attn.norm_k.weight"),
    (r"mixins\.adaln_layer\.clip_feature_key_layernorm_list\.(\d+)\.weight",
     r"blocks.\1.cross_attn.norm_k_img.weight"),
    (r"mixins\.adaln_layer\.adaLN_modulations\.(\d+)", r"blocks.\1.modulation"),
)
# One stored tensor -> equal row blocks, in this order.
_FUSED: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"transformer\.layers\.(\d+)\.attention\.query_key_value\.(weight|bias)",
     (r"blocks.\1.self_attn.q.\2", r"blocks.\1.self_attn.k.\2", r"blocks.\1.self_attn.v.\2")),
    (r"transformer\.layers\.(\d+)\.cross_attention\.key_value\.(weight|bias)",
     (r"blocks.\1.cross_attn.k.\2", r"blocks.\1.cross_attn.v.\2")),
    (r"mixins\.adaln_layer\.clip_feature_key_value_list\.(\d+)\.(weight|bias)",
     (r"blocks.\1.cross_attn.k_img.\2", r"blocks.\1.cross_attn.v_img.\2")),
)
_SINGLE_RE = tuple((re.compile(p), r) for p, r in _SINGLE)
_FUSED_RE = tuple((re.compile(p), r) for p, r in _FUSED)


def sat_to_wan(key: str, info: TensorInfo) -> list[tuple[str, TensorInfo]] | None:
    """The Wan-original tensors one SAT tensor holds (``None`` for a name this layout does not know)."""
    for pattern, repl in _SINGLE_RE:
        if pattern.fullmatch(key):
            return [(pattern.sub(repl, key), info)]
    for pattern, names in _FUSED_RE:
        if pattern.fullmatch(key):
            rows = info.shape[0]
            if rows % len(names):
                raise CheckpointError(f"{info.file}: {info.key} has {rows} rows, not {len(names)} equal parts")
            n = rows // len(names)
            return [(pattern.sub(name, key), info.rows(i * n, (i + 1) * n)) for i, name in enumerate(names)]
    return None


def map_sat_keys(infos: dict[str, TensorInfo], prefix: str) -> tuple[dict[str, TensorInfo], list[str], list[str]]:
    """``({diffusers key: stored tensor or rows}, ignored keys, foreign keys)`` for a SAT state dict."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    wan: dict[str, TensorInfo] = {}
    ignored: list[str] = []
    foreign: list[str] = []
    for key, info in infos.items():
        if any(key.startswith(p) for p in SAT_OTHER_PREFIXES):
            ignored.append(key)
            continue
        parts = sat_to_wan(key[len(prefix):], info) if key.startswith(prefix) else None
        if parts is None:
            foreign.append(key)
            continue
        wan.update(parts)
    # diffusers' converter only renames: feed it names and read the renaming back.
    renamed = convert_wan_transformer_to_diffusers({k: k for k in wan})
    return {new: wan[old] for new, old in renamed.items()}, sorted(ignored), sorted(foreign)


def find_sat_checkpoint(directory: Path) -> Path | None:
    """The model-states file of a SAT checkpoint folder (``latest`` + ``<tag>/``), else ``None``.

    The Kaleido download's root (with a ``model/`` folder) is accepted too.
    """
    if not (directory / "latest").is_file() and (directory / "model" / "latest").is_file():
        directory = directory / "model"
    tracker = directory / "latest"
    if not tracker.is_file():
        return None
    tag = tracker.read_text().strip()
    folder = directory / tag
    for name in SAT_FILES:
        if (folder / name).is_file():
            if name.startswith("mp_rank") and (folder / "mp_rank_01_model_states.pt").exists():
                raise CheckpointError(f"{folder}: the checkpoint is split for model parallelism (mp_rank_01 ...); "
                                      "merge it into one mp_rank_00_model_states.pt first.")
            return folder / name
    present = ", ".join(sorted(p.name for p in folder.iterdir())) if folder.is_dir() else "nothing"
    raise CheckpointError(f"{directory}: 'latest' names checkpoint {tag!r}, but {folder} holds {present} (expected "
                          f"{' or '.join(SAT_FILES)}). If the download came in parts, run its merge script "
                          "(merge_kaleido.py) first.")

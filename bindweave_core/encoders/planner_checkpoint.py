"""Finding and checking a Qwen2.5-VL checkpoint: its tokenizer, its key layout (HF, ComfyUI repacks,
with or without ``lm_head``), its loadability, and the ``inspect`` report."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import constants as C
from ..checkpoints.identify import describe, identify
from ..checkpoints.materialize import ScannedCheckpoint, split_scales
from ..checkpoints.safetensors_io import TensorInfo, read_header
from ..errors import CheckpointError
from ..model_files import where_to_get
from .planner_config import QWEN25_VL_7B_CONFIG, TINY_BYTES, TINY_SPECIAL_TOKENS


# ------------------------------------------------------------------------------------ tokenizers
def tiny_tokenizer():
    """A byte-level tokenizer (256 bytes + the Qwen special tokens), built in memory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({tok: TINY_BYTES + i for i, tok in enumerate(TINY_SPECIAL_TOKENS)})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(TINY_SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def is_tokenizer_dir(d: Path) -> bool:
    return d.is_dir() and ((d / "tokenizer.json").exists() or ((d / "vocab.json").exists()
                                                             and (d / "merges.txt").exists()))


def tokenizer_candidates(weights: Path) -> list[Path]:
    """Where a single-file planner's tokenizer may be: beside the file, or inside a ComfyUI install."""
    folder = weights.parent
    out = [folder / "qwen25_tokenizer", folder / "qwen2.5_tokenizer", folder / weights.stem, folder]
    with contextlib.suppress(ImportError, ValueError, AttributeError):
        spec = importlib.util.find_spec("comfy")
        if spec is not None and spec.origin:
            out.append(Path(spec.origin).parent / "text_encoders" / "qwen25_tokenizer")
    return out


TOKENIZER_HELP = ("a folder with the Qwen2.5 tokenizer (vocab.json, merges.txt, tokenizer_config.json): ComfyUI "
                   "ships it as comfy/text_encoders/qwen25_tokenizer/ inside the ComfyUI installation, and the "
                   "tokenizer files of https://huggingface.co/Qwen/Qwen2.5-VL-7B-Instruct work too")


def load_tokenizer(directory: Path):
    from transformers import AutoTokenizer

    if not is_tokenizer_dir(directory):
        raise CheckpointError(f"{directory}: no tokenizer here (expected tokenizer.json, or vocab.json + merges.txt "
                              f"+ tokenizer_config.json). Point at {TOKENIZER_HELP}.")
    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{directory}: the tokenizer files cannot be read ({e}). Use {TOKENIZER_HELP}.") from e


def check_tokenizer(tokenizer: Any, config: Any, where: Path | str) -> None:
    expected = {"<|image_pad|>": config.image_token_id, "<|video_pad|>": config.video_token_id,
                "<|vision_start|>": config.vision_start_token_id, "<|vision_end|>": config.vision_end_token_id}
    wrong = {t: (tokenizer.convert_tokens_to_ids(t), i) for t, i in expected.items()
             if tokenizer.convert_tokens_to_ids(t) != i}
    if wrong:
        detail = ", ".join(f"{t} is {got}, the model expects {want}" for t, (got, want) in wrong.items())
        raise CheckpointError(f"{where}: this tokenizer does not belong to the Qwen2.5-VL model ({detail}). "
                              f"Use {TOKENIZER_HELP}.")


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


def config_object(config: dict[str, Any]):
    from transformers import Qwen2_5_VLConfig

    try:
        return Qwen2_5_VLConfig(**{k: v for k, v in config.items() if k not in ("transformers_version",)})
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"not a usable Qwen2.5-VL configuration ({e}). Use the config.json of "
                              "https://huggingface.co/Qwen/Qwen2.5-VL-7B-Instruct.") from e


def empty_model(config: Any):
    """The model with parameters on the meta device; the rotary buffers are computed for real."""
    from accelerate import init_empty_weights
    from transformers import Qwen2_5_VLForConditionalGeneration

    with init_empty_weights(include_buffers=False):
        return Qwen2_5_VLForConditionalGeneration(config)


_EXPECTED_CACHE: dict[str, dict[str, tuple[int, ...]]] = {}


def _expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    key = json.dumps(config, sort_keys=True)
    if key not in _EXPECTED_CACHE:
        model = empty_model(config_object(config))
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


def check_loadable(ckpt: PlannerCheckpoint) -> None:
    hint = ""
    embed = ckpt.tensors.get("model.language_model.embed_tokens.weight")
    want = ckpt.config.get("hidden_size")
    if embed is not None and len(embed.shape) == 2 and embed.shape[1] != want:
        hint = (f"Its hidden size is {embed.shape[1]}, the expected model's is {want}: this is another Qwen2.5-VL "
                "size; BindWeave needs Qwen2.5-VL-7B-Instruct.")
    ckpt.require_matching_keys("Qwen2.5-VL", "planner", hint)


class MissingLMHead(nn.Module):
    """Stands in for ``lm_head`` when the file has none: encoding works, generation says why it cannot."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        raise CheckpointError("this planner file has no LM head (lm_head.weight), so it cannot generate text. Prompt "
                              "refinement needs a file with the LM head, e.g. the Qwen/Qwen2.5-VL-7B-Instruct "
                              "directory or ComfyUI's qwen_2.5_vl_7b.safetensors.")


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

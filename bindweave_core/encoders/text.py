"""UMT5-XXL text encoder (spec section 3): transformers' ``UMT5EncoderModel`` plus its tokenizer.

Layouts, told apart by their key names:

* ``hf``: the Hugging Face names (``shared.weight``, ``encoder.block.N.layer.0.SelfAttention.q.weight``,
  ``encoder.block.N.layer.1.DenseReluDense.wi_0.weight``, ``encoder.final_layer_norm.weight``). Used by the
  ``text_encoder/`` folder of ``Wan-AI/Wan2.1-I2V-14B-720P-Diffusers`` (tokenizer in the sibling
  ``tokenizer/``) and by ComfyUI's ``umt5_xxl_fp16.safetensors`` / ``umt5_xxl_fp8_e4m3fn_scaled.safetensors``.
  The fp8 file adds ``<layer>.scale_weight`` per linear layer and a ``scaled_fp8`` marker; the Comfy-Org files
  carry the sentencepiece model as a uint8 tensor named ``spiece_model`` (ComfyUI ships no UMT5 tokenizer).
* ``wan-original``: the names of Wan's own T5 (``token_embedding``, ``blocks.N.attn.q``,
  ``blocks.N.ffn.gate.0`` ...), as in Kijai's ``umt5-xxl-enc-bf16.safetensors``; no tokenizer inside.

Text is prepared as the official BindWeave inference did (MindSpeed-MM ``WanPipeline._get_prompt_embeds``,
identical to diffusers' ``WanPipeline._get_t5_prompt_embeds`` and Wan's ``clean='whitespace'``): the prompt
is cleaned (ftfy, HTML unescaped twice, whitespace runs collapsed), tokenized padded to 512 with truncation
and the ``</s>`` token, encoded with the attention mask, and every position past the real tokens is zeroed.
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .. import constants as C
from ..checkpoints.identify import describe, identify
from ..checkpoints.materialize import ScannedCheckpoint, materialize, split_scales
from ..checkpoints.safetensors_io import TensorInfo, component_dir, iter_tensors
from ..config import PRESETS
from ..errors import CheckpointError, InputError
from ..fp8 import swap_in_fp8_linears
from ..model_files import where_to_get
from .base import Encoder, check_before_load, header, problems_and_sizes, seeded_init_, size_differences

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, UMT5EncoderModel

try:  # the official cleaning used the `regex` module; its \s matches Unicode White_Space
    import regex as _re
except ImportError:  # pragma: no cover - transformers depends on regex
    _re = re

log = logging.getLogger("BindWeave")

# google/umt5-xxl encoder, as in the Wan diffusers repo's text_encoder/config.json and ComfyUI's
# umt5_config_xxl.json. "gated-gelu" = tanh-approximated GELU gate (gelu_new), no attention scaling.
UMT5_XXL_CONFIG: dict[str, Any] = dict(
    vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
    layer_norm_epsilon=1e-6, dropout_rate=0.1, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    tie_word_embeddings=False)
RELEASED = "UMT5-XXL"
UMT5_EXTRA_IDS = 300  # <extra_id_0..299> sit after the 256,000 sentencepiece pieces (ids 256000..256299)
SPIECE_KEY = "spiece_model"  # ComfyUI's embedded sentencepiece model (uint8 tensor of the .model bytes)
WEIGHT_FORMATS = C.ENCODER_WEIGHT_FORMATS
LAYOUTS = ("hf", "wan-original")
# Config entries compared with UMT5-XXL to tell a different model apart.
_SIZE_KEYS = ("d_model", "d_ff", "num_layers", "num_heads", "d_kv", "vocab_size", "relative_attention_num_buckets")
_TOKENIZER_HELP = ("pass tokenizer_dir= the 'tokenizer' folder of Wan-AI/Wan2.1-I2V-14B-720P-Diffusers "
                   "(or of google/umt5-xxl; ComfyUI-WanVideoWrapper ships one as configs/T5_tokenizer), "
                   "or use ComfyUI's umt5_xxl_fp8_e4m3fn_scaled.safetensors, which carries its tokenizer")

# Wan's T5 module names inside ``blocks.N`` -> transformers' names inside ``encoder.block.N``.
_WAN_BLOCK_NAMES = {
    "norm1": "layer.0.layer_norm",
    "attn.q": "layer.0.SelfAttention.q",
    "attn.k": "layer.0.SelfAttention.k",
    "attn.v": "layer.0.SelfAttention.v",
    "attn.o": "layer.0.SelfAttention.o",
    "pos_embedding.embedding": "layer.0.SelfAttention.relative_attention_bias",
    "norm2": "layer.1.layer_norm",
    "ffn.gate.0": "layer.1.DenseReluDense.wi_0",  # the GELU branch
    "ffn.fc1": "layer.1.DenseReluDense.wi_1",  # the linear branch
    "ffn.fc2": "layer.1.DenseReluDense.wo",
}
_WAN_TOP_NAMES = {"token_embedding": "shared", "norm": "encoder.final_layer_norm"}
_WAN_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)\.([^.]+)")
_BLOCK_INDEX = re.compile(r"encoder\.block\.(\d+)\.")


# ------------------------------------------------------------------------------------------ prompts
def clean_prompt(text: str) -> str:
    """The official prompt cleaning: ftfy, HTML unescaped twice, whitespace runs collapsed, stripped."""
    try:
        import ftfy
    except ImportError:  # pragma: no cover - ftfy is a dependency; diffusers also skips it when absent
        log.warning("ftfy is not installed: prompts are not mojibake-fixed (pip install ftfy)")
    else:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _re.sub(r"\s+", " ", text).strip()


# ------------------------------------------------------------------------------------------ keys
@dataclass
class UMT5Checkpoint(ScannedCheckpoint):
    """What a UMT5 checkpoint holds, from its headers only."""

    path: Path
    layout: str
    config: dict[str, Any]
    tokenizer: TensorInfo | None = None  # the embedded sentencepiece model, if any

    def size_differences(self) -> list[str]:
        """How this model's size differs from UMT5-XXL (empty for the real model)."""
        return size_differences(self.config, UMT5_XXL_CONFIG, _SIZE_KEYS, RELEASED)


def _wan_to_hf(key: str) -> str | None:
    m = _WAN_BLOCK_KEY.fullmatch(key)
    if m and m.group(2) in _WAN_BLOCK_NAMES:
        return f"encoder.block.{m.group(1)}.{_WAN_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    module, _, leaf = key.rpartition(".")
    if module in _WAN_TOP_NAMES:
        return f"{_WAN_TOP_NAMES[module]}.{leaf}"
    return None


def _prefix_before(keys: list[str], marker: str) -> str:
    return next((k[: k.index(marker)] for k in keys if marker in k), "")


def _not_umt5(path: Path, keys: list[str]) -> CheckpointError:
    return CheckpointError(f"{path}: this is not a UMT5 text encoder; it looks like {describe(keys)}. "
                           + where_to_get("text_encoder"))


def map_keys(keys: list[str], path: Path) -> tuple[str, dict[str, str], str | None, list[str], list[str]]:
    """``(layout, {transformers key: stored key}, tokenizer key, ignored, foreign)`` for a UMT5 file."""
    sig = identify(keys)
    if sig is None or sig.kind != "umt5":
        raise _not_umt5(path, keys)
    tokenizer_key = next((k for k in keys if k.rpartition(".")[2] == SPIECE_KEY), None)
    mapping: dict[str, str] = {}
    ignored: list[str] = []
    foreign: list[str] = []
    if sig.layout == "wan-original":
        prefix = _prefix_before(keys, "blocks.0.attn.q.")
        for k in keys:
            if k == tokenizer_key:
                continue
            short = k[len(prefix):] if k.startswith(prefix) else None
            new = _wan_to_hf(short) if short is not None else None
            if new is not None:
                mapping[new] = k
            elif short is not None and short.rpartition(".")[2] == "scaled_fp8":
                mapping[short] = k  # split_scales files it under ignored
            else:
                foreign.append(k)
    else:
        prefix = _prefix_before(keys, "encoder.block.0.layer.0.SelfAttention.")
        shortened = {k[len(prefix):]: k for k in keys if k.startswith(prefix) and k != tokenizer_key}
        foreign = [k for k in keys if not k.startswith(prefix) and k != tokenizer_key]
        has_shared = "shared.weight" in shortened
        for short, k in shortened.items():
            if short.startswith("encoder.embed_tokens."):
                # the same table as shared.weight; some writers store it under this name only
                if has_shared:
                    ignored.append(k)
                    continue
                short = "shared." + short[len("encoder.embed_tokens."):]
            if short.startswith(("decoder.", "lm_head.")):
                ignored.append(k)  # a full encoder-decoder UMT5: only the encoder is used
                continue
            mapping[short] = k
    return sig.layout, mapping, tokenizer_key, ignored, foreign


def _check_is_umt5(tensors: dict[str, TensorInfo], path: Path, num_layers: int) -> None:
    """T5 / T5 v1.1 files (e.g. Flux's t5xxl_fp16.safetensors) share one key layout with UMT5."""
    first_ffn = "encoder.block.0.layer.1.DenseReluDense."
    if first_ffn + "wi.weight" in tensors:
        raise CheckpointError(f"{path}: this is an original T5 encoder (ungated feed-forward), not UMT5-XXL. "
                              + where_to_get("text_encoder"))
    if num_layers > 1 and "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" not in tensors:
        raise CheckpointError(
            f"{path}: this is a T5 encoder (one position bias shared by all layers, like t5xxl_fp16.safetensors "
            "used by Flux/SD3), not the UMT5-XXL encoder Wan and BindWeave use. " + where_to_get("text_encoder"))


def infer_config(tensors: dict[str, TensorInfo], path: Path) -> dict[str, Any]:
    """UMT5-XXL's config with the sizes read from the tensor shapes (so smaller test files load too)."""
    blocks = sorted({int(m.group(1)) for k in tensors if (m := _BLOCK_INDEX.match(k))})
    needed = ("shared.weight", "encoder.block.0.layer.0.SelfAttention.q.weight",
              "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    absent = [k for k in needed if k not in tensors]
    if absent or not blocks:
        raise CheckpointError(f"{path}: incomplete UMT5 checkpoint (no {', '.join(absent) or 'encoder blocks'}). "
                              "Download the file again. " + where_to_get("text_encoder"))
    _check_is_umt5(tensors, path, len(blocks))
    wi_0 = tensors.get("encoder.block.0.layer.1.DenseReluDense.wi_0.weight")
    if wi_0 is None:
        raise CheckpointError(f"{path}: incomplete UMT5 checkpoint (no gated feed-forward in block 0).")
    vocab, d_model = tensors["shared.weight"].shape
    inner = tensors["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0]
    buckets, heads = tensors["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape
    return dict(UMT5_XXL_CONFIG, vocab_size=vocab, d_model=d_model, d_ff=wi_0.shape[0], num_layers=max(blocks) + 1,
                num_heads=heads, d_kv=inner // heads, relative_attention_num_buckets=buckets)


def build_model(config: dict[str, Any], device: str | torch.device = "meta") -> UMT5EncoderModel:
    """A ``UMT5EncoderModel`` (on ``device``) whose input embedding is one module for both of its names."""
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = UMT5Config(**config, is_encoder_decoder=False, use_cache=False)
    with torch.device(device):
        model = UMT5EncoderModel(cfg)
    # transformers ties encoder.embed_tokens to shared; making them one module means one tensor fills both.
    model.encoder.embed_tokens = model.shared
    return model


def _expected_keys(model: torch.nn.Module) -> set[str]:
    return {k for k in model.state_dict() if not k.startswith("encoder.embed_tokens.")}


def scan_umt5(path: str | os.PathLike, infos: dict[str, TensorInfo] | None = None) -> UMT5Checkpoint:
    """Read a UMT5 checkpoint's headers: layout, config, fp8 scales, tokenizer and key problems."""
    path, infos = header(path, infos)
    layout, mapping, tokenizer_key, ignored, foreign = map_keys(list(infos), path)
    tensors, scales, markers = split_scales(mapping, infos)
    config = infer_config(tensors, path)
    model = build_model(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k in _expected_keys(model)}
    ckpt = UMT5Checkpoint(
        path=path, layout=layout, config=config, tensors=tensors, scales=scales,
        tokenizer=infos[tokenizer_key] if tokenizer_key else None, ignored=sorted(ignored + markers))
    ckpt.compare_keys(expected, foreign)
    return ckpt


# ------------------------------------------------------------------------------------------ tokenizers
def tokenizer_from_sentencepiece(model_bytes: bytes, extra_ids: int = UMT5_EXTRA_IDS) -> PreTrainedTokenizerBase:
    """The fast UMT5 tokenizer for a sentencepiece ``.model``, built from its pieces and normaliser.

    Mirrors how ``spiece.model`` became google/umt5-xxl's ``tokenizer.json``: the unigram pieces with their
    scores and the model's own unknown id, its precompiled normalisation table, ``\u2581`` word boundaries,
    ``</s>`` appended, and the sentinels ``<extra_id_0..>`` after the pieces (highest number first).
    Built here rather than by transformers' converter, whose T5 class assumes ``<unk>`` is id 2 (it is 3 in UMT5).
    """
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        normalizers,
        pre_tokenizers,
        processors,
    )
    from tokenizers.models import Unigram
    from transformers import PreTrainedTokenizerFast

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_bytes)
    if not proto.pieces or proto.trainer_spec.model_type != 1:  # 1 = unigram
        raise ValueError("not a unigram sentencepiece model")
    spec = proto.trainer_spec
    pieces = [(p.piece, p.score) for p in proto.pieces]
    sentinels = [f"<extra_id_{i}>" for i in range(extra_ids - 1, -1, -1)]
    tok = Tokenizer(Unigram(pieces + [(s, 0.0) for s in sentinels], unk_id=spec.unk_id,
                            byte_fallback=spec.byte_fallback))
    steps = [normalizers.Replace(Regex(" {2,}"), " ")]
    if proto.normalizer_spec.precompiled_charsmap:
        steps.insert(0, normalizers.Precompiled(proto.normalizer_spec.precompiled_charsmap))
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)])
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    special = {i: pieces[i][0] for i in (spec.pad_id, spec.eos_id, spec.unk_id, spec.bos_id) if 0 <= i < len(pieces)}
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in [*special.values(), *sentinels]])
    eos = pieces[spec.eos_id][0]
    tok.post_processor = processors.TemplateProcessing(single=f"$A {eos}", pair=f"$A {eos} $B {eos}",
                                                       special_tokens=[(eos, spec.eos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=special.get(spec.pad_id),
                                   unk_token=special.get(spec.unk_id))


def _special_tokens(path: Path) -> dict[str, str]:
    """pad/eos/unk token strings from a tokenizer folder's configs (UMT5's defaults otherwise)."""
    found = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        try:
            data = json.loads((path / name).read_text())
        except (OSError, ValueError):
            continue
        for key in found:
            value = data.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                found[key] = value
    return found


def load_tokenizer_dir(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """A UMT5 tokenizer from a Hugging Face tokenizer folder, a folder with only ``spiece.model``, or that file.

    ``tokenizer.json`` is used as it is: transformers 5's ``T5Tokenizer`` rebuilds its unigram model with
    ``<unk>`` at id 2, which is ``<s>`` in UMT5 (unknown characters would become ``<s>``).
    """
    path = Path(path)
    if path.is_file() and path.suffix == ".model":
        return tokenizer_from_sentencepiece(path.read_bytes())
    if not path.is_dir():
        raise CheckpointError(f"{path}: tokenizer folder not found; {_TOKENIZER_HELP}.")
    try:
        if (path / "tokenizer.json").exists():
            from tokenizers import Tokenizer
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(str(path / "tokenizer.json")),
                                           **_special_tokens(path))
        if (path / "spiece.model").exists():
            return tokenizer_from_sentencepiece((path / "spiece.model").read_bytes())
        if (path / "tokenizer_config.json").exists():
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # tokenizers/sentencepiece raise their own exception types on bad files
        raise CheckpointError(f"{path}: cannot read this tokenizer ({e}); {_TOKENIZER_HELP}.") from e
    raise CheckpointError(f"{path}: no tokenizer.json, tokenizer_config.json or spiece.model here; {_TOKENIZER_HELP}.")


def _find_tokenizer(ckpt: UMT5Checkpoint, tokenizer_dir: str | os.PathLike | None) -> PreTrainedTokenizerBase:
    if tokenizer_dir is not None:
        return load_tokenizer_dir(tokenizer_dir)
    if ckpt.tokenizer is not None:
        (_, stored), = iter_tensors([ckpt.tokenizer])
        try:
            return tokenizer_from_sentencepiece(stored.contiguous().numpy().tobytes())
        except Exception as e:  # sentencepiece/protobuf raise their own types on bad bytes
            raise CheckpointError(f"{ckpt.path}: the tokenizer stored inside the file ({SPIECE_KEY}) cannot be read "
                                  f"({e}); {_TOKENIZER_HELP}.") from e
    if ckpt.path.is_dir():
        for candidate in (ckpt.path, ckpt.path.parent / "tokenizer"):
            if any((candidate / n).exists() for n in ("tokenizer.json", "tokenizer_config.json", "spiece.model")):
                return load_tokenizer_dir(candidate)
    raise CheckpointError(f"{ckpt.path}: the UMT5 tokenizer is not inside this file; {_TOKENIZER_HELP}.")


def tiny_tokenizer() -> PreTrainedTokenizerBase:
    """A small UMT5-style tokenizer built in memory: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, unigram pieces."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import PreTrainedTokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -6.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"-()"]
    pieces += [("\u2581" + c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    words = ("the", "a", "of", "and", "in", "on", "with", "man", "woman", "dog", "cat", "walks", "red", "park",
             "video", "person", "holding", "static", "blurred")
    pieces += [("\u2581" + w, -3.0) for w in words]
    tok = Tokenizer(Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


# ------------------------------------------------------------------------------------------ encoder
def _tiny_value(name: str, p: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    if "layer_norm" in name:
        return 1.0 + 0.1 * noise
    if name.startswith("shared.") or "relative_attention_bias" in name:
        return noise
    return noise * p.shape[-1] ** -0.5


def warn_if_truncated(tokenizer: Any, texts: list[str], text_len: int = C.TEXT_LEN) -> list[int]:
    """Token counts of ``texts`` (end token included); a warning naming them for each one UMT5 cuts."""
    counts = [len(ids) for ids in tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]]
    for text, n in zip(texts, counts):
        if n > text_len:
            log.warning("a prompt of %d UMT5 tokens (%d characters, starting %r): the text encoder keeps %d (the "
                        "first %d and the end token) and drops %d; the planner (BindWeave, not Kaleido) reads the "
                        "whole prompt. Shorten it to keep all of it in the text branch.", n, len(text), text[:40], text_len,
                        text_len - 1, n - text_len)
    return counts


# ------------------------------------------------------------------------------------------ inspect
def inspect_report(path: Path, infos: dict[str, TensorInfo], metadata: dict[str, str]) -> dict:
    """The UMT5 part of ``python -m bindweave_core inspect``."""
    ckpt = scan_umt5(path, infos)
    cfg = ckpt.config
    problems = problems_and_sizes(ckpt, ckpt.size_differences(), "UMT5-XXL encoder")
    if ckpt.tokenizer is not None:
        tokenizer = f"embedded sentencepiece model ({math.prod(ckpt.tokenizer.shape):,} bytes)"
    else:
        tokenizer = "not included: give the tokenizer folder (tokenizer_dir)"
    return {"layout": ckpt.layout, "fp8_scaled": ckpt.fp8_scaled, "fp8_scales": ckpt.fp8_scale_kinds,
            "parameters": ckpt.parameter_count, "tokenizer": tokenizer, "extras": ckpt.extras(),
            "config": {"num_layers": cfg["num_layers"], "num_heads": cfg["num_heads"], "head_dim": cfg["d_kv"],
                       "ffn_dim": cfg["d_ff"], "text_dim": cfg["d_model"], "vocab_size": cfg["vocab_size"]},
            "problems": problems}


class TextEncoder(Encoder):
    """UMT5 encoder + tokenizer: prompts -> ``[B, 512, d_model]`` states, zero past the real tokens."""

    inspect_report = staticmethod(inspect_report)

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, text_len: int = C.TEXT_LEN,
                 clean_prompts: bool = True, source: str = "") -> None:
        super().__init__(model, source=source)
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "right"  # the zeroing below assumes padding after the tokens
        self.text_len = text_len
        self.clean_prompts = clean_prompts

    @property
    def dtype(self) -> torch.dtype:
        return self.model.shared.weight.dtype

    @property
    def text_dim(self) -> int:
        return int(self.model.config.d_model)

    # -------------------------------------------------------------------------------- construction
    @classmethod
    def load(cls, path: str | os.PathLike, *, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
             tokenizer_dir: str | os.PathLike | None = None, weight_format: str = "default") -> TextEncoder:
        """Load any of the UMT5 layouts above without holding the weights twice.

        Args:
            tokenizer_dir: tokenizer folder (or ``spiece.model``); needed for files without an embedded
                tokenizer (Kijai's ``umt5-xxl-enc-bf16.safetensors``, ``umt5_xxl_fp16.safetensors`` from
                elsewhere). A diffusers ``text_encoder/`` folder finds its sibling ``tokenizer/`` itself.
            weight_format: ``default`` (fp8 files dequantised to ``dtype``) or ``fp8`` (attention and gate
                linear weights kept as fp8 storage; ``wo`` stays in ``dtype`` because transformers casts its
                input to ``wo``'s weight dtype).
        """
        if weight_format not in WEIGHT_FORMATS:
            raise ValueError(f"weight_format must be one of {WEIGHT_FORMATS}, got {weight_format!r}")
        path = component_dir(Path(path), "text_encoder")
        ckpt = scan_umt5(path)
        check_before_load(ckpt, "a UMT5 encoder", "text_encoder", ckpt.size_differences(), RELEASED)
        tokenizer = _find_tokenizer(ckpt, tokenizer_dir)  # before the weights: fail fast
        if len(tokenizer) > ckpt.config["vocab_size"]:
            raise CheckpointError(f"the tokenizer has {len(tokenizer):,} tokens but the model only "
                                  f"{ckpt.config['vocab_size']:,}: it belongs to another model; {_TOKENIZER_HELP}.")
        model = build_model(ckpt.config)
        fp8_modules: set[str] = set()
        if weight_format == "fp8":
            fp8_modules = {n for n, m in model.named_modules() if type(m) is torch.nn.Linear
                           and n.startswith("encoder.block.") and not n.endswith(".wo")}
            swap_in_fp8_linears(model, sorted(fp8_modules))
        # transformers keeps `wo` in float32 when loading in float16 (UMT5 overflows otherwise).
        keep_fp32 = ("wo",) if dtype == torch.float16 else ()
        materialize(model, ckpt.tensors, scales=ckpt.scales, dtype=dtype, device=device, fp8_modules=fp8_modules,
                    keep_fp32=keep_fp32, strict=True, source=path)
        model.eval().requires_grad_(False)
        log.info("loaded UMT5 text encoder (%s layout%s, %s) from %s", ckpt.layout,
                 ", fp8 scaled" if ckpt.fp8_scaled else "",
                 "fp8 storage" if fp8_modules else str(dtype).replace("torch.", ""), path)
        return cls(model, tokenizer, source=str(path)).loaded_from(ckpt)

    @classmethod
    def tiny(cls, seed: int = 0) -> TextEncoder:
        """A tiny random UMT5 (width ``PRESETS['tiny'].text_dim``, 2 layers) with an in-memory tokenizer."""
        tokenizer = tiny_tokenizer()
        config = dict(UMT5_XXL_CONFIG, vocab_size=128, d_model=PRESETS["tiny"].text_dim, d_kv=8, d_ff=64,
                      num_layers=2, num_heads=4, dropout_rate=0.0)
        model = build_model(config, device="cpu")
        seeded_init_(model, seed, _tiny_value)
        return cls(model.eval().requires_grad_(False), tokenizer, source=f"tiny(seed={seed})")

    # -------------------------------------------------------------------------------- encoding
    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)``, each ``[B, 512]``, as the official pipeline tokenized."""
        texts = [clean_prompt(p) if self.clean_prompts else p for p in prompts]
        batch = self.tokenizer(texts, padding="max_length", max_length=self.text_len, truncation=True,
                               add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        warn_if_truncated(self.tokenizer, texts, self.text_len)
        return batch["input_ids"], batch["attention_mask"]

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """``[B, 512, d_model]`` last hidden states (after the final norm), zero past each prompt's tokens."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise InputError(f"encode() takes a non-empty list of prompt strings, got {prompts!r}")
        ids, mask = self.tokenize(list(prompts))
        device = self.device
        ids, mask = ids.to(device), mask.to(device)
        states = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        lengths = mask.gt(0).sum(dim=1)
        real = torch.arange(states.shape[1], device=device)[None, :] < lengths[:, None]
        return states.masked_fill(~real[..., None], 0.0)

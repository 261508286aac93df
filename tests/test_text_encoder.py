"""UMT5 text encoder: the official tokenization/zeroing, every file layout users have, clear errors.

Reference numbers come from transformers' UMT5EncoderModel called directly, sentencepiece's own
tokenization and key names written out here (not taken from the loader).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from safetensors.torch import save_file
from transformers import UMT5Config, UMT5EncoderModel

from bindweave_core.checkpoints.safetensors_io import TensorInfo
from bindweave_core.cli import main as cli_main
from bindweave_core.encoders.text import (
    TextEncoder,
    clean_prompt,
    inspect_report,
    load_tokenizer_dir,
    tokenizer_from_sentencepiece,
)
from bindweave_core.errors import CheckpointError, InputError
from bindweave_core.fp8 import FP8Linear
from bindweave_core.inspection import inspect_checkpoint
from helpers import randomize_

# A small UMT5 with the real architecture; vocab 384 holds a 48-piece sentencepiece model + 300 sentinels.
SMALL = {"vocab_size": 384, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4,
         "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
         "feed_forward_proj": "gated-gelu", "layer_norm_epsilon": 1e-6, "dropout_rate": 0.0}
PROMPTS = ["A woman in a red dress walks on the beach at sunset", "a dog in the park"]
CORPUS = ["a photo of a dog running in the park", "the quick brown fox jumps over the lazy dog",
          "A woman in a red dress walks on the beach at sunset", "Ein Mann läuft über die Straße"] * 40
FP8 = torch.float8_e4m3fn
# Wan's T5 module names (wan/modules/t5.py) for the transformers ones, written out independently.
WAN_NAMES = {
    "layer.0.layer_norm": "norm1", "layer.0.SelfAttention.q": "attn.q", "layer.0.SelfAttention.k": "attn.k",
    "layer.0.SelfAttention.v": "attn.v", "layer.0.SelfAttention.o": "attn.o",
    "layer.0.SelfAttention.relative_attention_bias": "pos_embedding.embedding", "layer.1.layer_norm": "norm2",
    "layer.1.DenseReluDense.wi_0": "ffn.gate.0", "layer.1.DenseReluDense.wi_1": "ffn.fc1",
    "layer.1.DenseReluDense.wo": "ffn.fc2",
}
SIZE_PROBLEM = ("not the UMT5-XXL encoder BindWeave needs: d_model 32 (UMT5-XXL: 4096), d_ff 64 (UMT5-XXL: 10240), "
                "num_layers 2 (UMT5-XXL: 24), num_heads 4 (UMT5-XXL: 64), d_kv 8 (UMT5-XXL: 64), "
                "vocab_size 384 (UMT5-XXL: 256384)")
LINEARS = ("SelfAttention.q.", "SelfAttention.k.", "SelfAttention.v.", "SelfAttention.o.", "wi_0.", "wi_1.", "wo.")


def to_wan(key: str) -> str:
    if key == "shared.weight":
        return "token_embedding.weight"
    if key == "encoder.final_layer_norm.weight":
        return "norm.weight"
    _, _, i, rest = key.split(".", 3)
    module, _, leaf = rest.rpartition(".")
    return f"blocks.{i}.{WAN_NAMES[module]}.{leaf}"


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def spiece() -> bytes:
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=buf, vocab_size=48, model_type="unigram", num_threads=1,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="</s>", bos_piece="<s>",
        unk_piece="<unk>", minloglevel=2)
    return buf.getvalue()


@pytest.fixture(scope="module")
def reference() -> UMT5EncoderModel:
    model = UMT5EncoderModel(UMT5Config(**SMALL, is_encoder_decoder=False, use_cache=False))
    randomize_(model, seed=5)
    with torch.no_grad():  # bf16-representable, so bf16/fp16 files hold these exact values
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    return model.eval()


@pytest.fixture(scope="module")
def weights(reference) -> dict[str, torch.Tensor]:
    """The state dict under its Hugging Face names, stored once (as the Wan diffusers files do)."""
    return {k: v.clone() for k, v in reference.state_dict().items() if k != "encoder.embed_tokens.weight"}


def official_ids(spiece: bytes, prompts: list[str], length: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """sentencepiece ids + </s>, right-padded with <pad>=0 to ``length``, and the mask."""
    sp = spm.SentencePieceProcessor(model_proto=spiece)
    ids = torch.zeros(len(prompts), length, dtype=torch.long)
    mask = torch.zeros(len(prompts), length, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens = (sp.encode(p) + [1])[:length]
        ids[i, : len(tokens)] = torch.tensor(tokens)
        mask[i, : len(tokens)] = 1
    return ids, mask


def direct(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """transformers called directly, then every position past the real tokens set to zero."""
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state.clone()
    for i, n in enumerate(mask.sum(1).tolist()):
        out[i, n:] = 0
    return out


def expected(reference, spiece, prompts=PROMPTS):
    return direct(reference, *official_ids(spiece, prompts))


def fp8_quantise(weights: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """ComfyUI-style scaled fp8 (per-tensor scale_weight + scaled_fp8 marker) and its dequantised values."""
    stored, dequantised = {}, {}
    for k, v in weights.items():
        if k.endswith(".weight") and any(s in k for s in LINEARS):
            scale = v.abs().amax().float() / 448.0
            q = (v.float() / scale).to(FP8)
            stored[k], stored[k[: -len("weight")] + "scale_weight"] = q, scale.reshape(())
            dequantised[k] = q.float() * scale
        else:
            stored[k], dequantised[k] = v.to(torch.float16), v.to(torch.float16).float()
    stored["scaled_fp8"] = torch.empty(0, dtype=FP8)
    return stored, dequantised


def with_weights(reference, values: dict[str, torch.Tensor]) -> UMT5EncoderModel:
    model = UMT5EncoderModel(reference.config)
    model.load_state_dict({**values, "encoder.embed_tokens.weight": values["shared.weight"]})
    return model.eval()


def spiece_tensor(spiece: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(spiece), dtype=torch.uint8)


def assert_states(actual: torch.Tensor, reference: torch.Tensor, atol: float = 1e-5) -> None:
    assert actual.shape == reference.shape
    torch.testing.assert_close(actual.float(), reference.float(), rtol=0, atol=atol)


# ------------------------------------------------------------------------------------------ encoding
def test_tiny_encode_is_the_direct_model_call_zeroed_past_the_tokens():
    enc = TextEncoder.tiny(seed=0)
    batch = enc.tokenizer(PROMPTS, padding="max_length", max_length=512, truncation=True,
                          add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    ref = direct(enc.model, batch["input_ids"], batch["attention_mask"])
    out = enc.encode(PROMPTS)
    assert out.shape == (2, 512, 32)
    lengths = batch["attention_mask"].sum(1).tolist()
    assert lengths[0] != lengths[1] and max(lengths) < 40
    assert_states(out, ref, atol=1e-6)
    for i, n in enumerate(lengths):
        assert (out[i, :n].abs().sum(-1) > 0).all()  # every real token carries a state
        assert torch.count_nonzero(out[i, n:]) == 0  # exactly zero afterwards


def test_long_prompt_is_truncated_to_512_tokens_ending_with_eos():
    enc = TextEncoder.tiny(seed=0)
    long_prompt = " ".join(["the red dog walks in the park"] * 120)  # ~840 words
    ids, mask = enc.tokenize([long_prompt, "a cat"])
    assert ids.shape == (2, 512) and int(mask[0].sum()) == 512 and int(ids[0, -1]) == 1
    out = enc.encode([long_prompt, "a cat"])
    assert out.shape == (2, 512, 32)
    assert (out[0].abs().sum(-1) > 0).all()
    assert_states(out, direct(enc.model, ids, mask), atol=1e-6)


def test_batch_rows_equal_single_prompts():
    enc = TextEncoder.tiny(seed=3)
    both = enc.encode(PROMPTS)
    assert_states(both[:1], enc.encode(PROMPTS[:1]), atol=1e-5)
    assert_states(both[1:], enc.encode(PROMPTS[1:]), atol=1e-5)


def test_prompts_are_cleaned_as_the_official_pipeline():
    assert clean_prompt("  a  dog\n\tin the   park ") == "a dog in the park"
    assert clean_prompt("Tom &amp;amp; Jerry") == "Tom & Jerry"  # unescaped twice
    assert clean_prompt("caf\u00c3\u00a9 au lait") == "café au lait"  # ftfy mojibake repair
    enc = TextEncoder.tiny(seed=0)
    assert torch.equal(enc.encode(["a  red\n dog"]), enc.encode(["a red dog"]))


def test_tiny_is_deterministic_from_the_seed():
    a, b, c = TextEncoder.tiny(seed=7), TextEncoder.tiny(seed=7), TextEncoder.tiny(seed=8)
    assert torch.equal(a.encode(["a dog"]), b.encode(["a dog"]))
    assert not torch.equal(a.encode(["a dog"]), c.encode(["a dog"]))
    assert a.tokenizer.pad_token_id == 0 and a.tokenizer.eos_token_id == 1
    with pytest.raises(InputError, match="non-empty list of prompt strings"):
        a.encode([])


# ------------------------------------------------------------------------------------------ layouts
@pytest.mark.parametrize("prefix", ["", "text_encoders.umt5xxl.transformer."])
def test_comfy_fp16_file_with_embedded_tokenizer(reference, weights, spiece, tmp_path, prefix):
    path = tmp_path / "umt5_xxl_fp16.safetensors"
    tensors = {prefix + k: v.to(torch.float16) for k, v in weights.items()}
    save_file({**tensors, "spiece_model": spiece_tensor(spiece)}, str(path))
    enc = TextEncoder.load(path, dtype=torch.float32)
    assert_states(enc.encode(PROMPTS), expected(reference, spiece))
    assert len(enc.tokenizer) == 48 + 300  # pieces + <extra_id_0..299>


def test_comfy_fp8_scaled_file_is_dequantised(reference, weights, spiece, tmp_path):
    stored, dequantised = fp8_quantise(weights)
    path = tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
    save_file({**stored, "spiece_model": spiece_tensor(spiece)}, str(path))
    enc = TextEncoder.load(path, dtype=torch.float32)
    ref = expected(with_weights(reference, dequantised), spiece)
    assert_states(enc.encode(PROMPTS), ref)
    assert not torch.equal(ref, expected(reference, spiece))  # fp8 rounding is visible, and matched


def test_fp8_weight_format_keeps_fp8_storage(reference, weights, spiece, tmp_path):
    stored, dequantised = fp8_quantise(weights)
    path = tmp_path / "umt5_fp8.safetensors"
    save_file({**stored, "spiece_model": spiece_tensor(spiece)}, str(path))
    enc = TextEncoder.load(path, dtype=torch.float32, weight_format="fp8")
    q = enc.model.encoder.block[0].layer[0].SelfAttention.q
    assert isinstance(q, FP8Linear) and q.weight.dtype == FP8
    assert enc.model.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    assert_states(enc.encode(PROMPTS), expected(with_weights(reference, dequantised), spiece))


def test_kijai_original_wan_layout_needs_and_uses_a_tokenizer_folder(reference, weights, spiece, tmp_path):
    path = tmp_path / "umt5-xxl-enc-bf16.safetensors"
    save_file({to_wan(k): v.to(torch.bfloat16) for k, v in weights.items()}, str(path))
    with pytest.raises(CheckpointError, match="tokenizer_dir.*Wan2.1-I2V-14B-720P-Diffusers"):
        TextEncoder.load(path)
    # a Hugging Face tokenizer folder (tokenizer.json), written from a tokenizer built from spiece.model
    spiece_dir = tmp_path / "spiece_only"
    spiece_dir.mkdir()
    (spiece_dir / "spiece.model").write_bytes(spiece)
    hf_dir = tmp_path / "T5_tokenizer"
    TextEncoder.load(path, tokenizer_dir=spiece_dir, dtype=torch.float32).tokenizer.save_pretrained(hf_dir)
    assert (hf_dir / "tokenizer.json").exists()
    enc = TextEncoder.load(path, tokenizer_dir=hf_dir, dtype=torch.float32)
    assert_states(enc.encode(PROMPTS), expected(reference, spiece))


def test_diffusers_text_encoder_folder_finds_its_sibling_tokenizer(reference, weights, spiece, tmp_path):
    repo = tmp_path / "Wan2.1-I2V-14B-720P-Diffusers"
    (repo / "text_encoder").mkdir(parents=True)
    (repo / "tokenizer").mkdir()
    (repo / "tokenizer" / "spiece.model").write_bytes(spiece)
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, keys in shards.items():
        save_file({k: weights[k].to(torch.bfloat16) for k in keys}, str(repo / "text_encoder" / shard))
    index = {"metadata": {}, "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (repo / "text_encoder" / "model.safetensors.index.json").write_text(json.dumps(index))
    reference.config.to_json_file(str(repo / "text_encoder" / "config.json"))
    ref = expected(reference, spiece)
    assert_states(TextEncoder.load(repo / "text_encoder", dtype=torch.float32).encode(PROMPTS), ref)
    assert_states(TextEncoder.load(repo, dtype=torch.float32).encode(PROMPTS), ref)  # the repo root works too


def test_tokenizer_folder_keeps_unk_at_its_sentencepiece_id(spiece, tmp_path):
    """A tokenizer folder as in the Wan diffusers repo (tokenizer.json + a T5Tokenizer config)."""
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    tokenizer_from_sentencepiece(spiece).backend_tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "spiece.model").write_bytes(spiece)
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "T5Tokenizer", "extra_ids": 300, "eos_token": "</s>", "pad_token": "<pad>",
         "unk_token": "<unk>", "bos_token": "<s>"}))
    text = "a dog \u03a9 in the park \u6771"  # two characters the model has no piece for
    sp = spm.SentencePieceProcessor(model_proto=spiece)
    ids = load_tokenizer_dir(folder)(text).input_ids
    assert ids == sp.encode(text) + [1] and ids.count(3) == 2  # <unk> is id 3 in UMT5 (<s> is 2)


# ------------------------------------------------------------------------------------------ errors
def test_wrong_models_say_what_they_look_like(weights, tmp_path):
    clip = tmp_path / "clip_vision_h.safetensors"
    save_file({"vision_model.encoder.layers.0.self_attn.q_proj.weight": torch.zeros(4, 4)}, str(clip))
    with pytest.raises(CheckpointError, match="CLIP vision encoder.*umt5_xxl_fp8_e4m3fn_scaled"):
        TextEncoder.load(clip)
    # T5 v1.1 (Flux/SD3's t5xxl): same names, but only block 0 has a position bias
    t5 = tmp_path / "t5xxl_fp16.safetensors"
    save_file({k: v for k, v in weights.items() if not k.startswith("encoder.block.1.layer.0.SelfAttention.rel")},
              str(t5))
    with pytest.raises(CheckpointError, match="T5 encoder.*not the UMT5-XXL"):
        TextEncoder.load(t5)


def test_missing_keys_are_named_and_unknown_extras_only_warned(weights, spiece, tmp_path, caplog):
    path = tmp_path / "broken.safetensors"
    broken = {k: v for k, v in weights.items() if k != "encoder.block.1.layer.1.DenseReluDense.wo.weight"}
    save_file({**broken, "encoder.block.0.extra.weight": torch.zeros(2), "spiece_model": spiece_tensor(spiece)},
              str(path))
    with pytest.raises(CheckpointError, match=r"missing 1 keys: encoder\.block\.1\.layer\.1\.DenseReluDense\.wo"
                                              r"\.weight"):
        TextEncoder.load(path)
    assert "unexpected 1 keys: encoder.block.0.extra.weight" in caplog.text


def test_full_umt5_with_lm_head_decoder_and_markers_loads_its_encoder(reference, weights, spiece, tmp_path, caplog):
    """HF names of a full encoder-decoder save (``lm_head``, ``decoder.*``, ``encoder.embed_tokens`` beside
    ``shared``) plus ComfyUI's harmless extras: the encoder loads, nothing is warned about. Names:
    transformers' UMT5ForConditionalGeneration; ComfyUI comfy/utils.py convert_old_quants (``scaled_fp8``,
    ``scale_input``), yzkee/ComfyUI @ 783545f689a0af730065994b46b382ae24844c99."""
    d = SMALL["d_model"]
    extras = {"lm_head.weight": torch.randn(SMALL["vocab_size"], d), "encoder.embed_tokens.weight": weights["shared.weight"],
              "decoder.block.0.layer.0.SelfAttention.q.weight": torch.randn(d, d),
              "scaled_fp8": torch.empty(0, dtype=FP8), "encoder.block.0.layer.0.SelfAttention.q.scale_input": torch.ones(())}
    path = tmp_path / "umt5_full.safetensors"
    save_file({**{k: v.to(torch.float16) for k, v in weights.items()}, **extras, "spiece_model": spiece_tensor(spiece)},
              str(path))
    enc = TextEncoder.load(path, dtype=torch.float32)
    assert "unexpected" not in caplog.text and not enc.model.checkpoint_info.unexpected
    assert_states(enc.encode(PROMPTS), expected(reference, spiece), atol=1e-6)


def test_wrongly_shaped_tensor_is_named_with_its_shapes(weights, spiece, tmp_path):
    path = tmp_path / "misshapen.safetensors"
    key = "encoder.block.1.layer.1.DenseReluDense.wi_1.weight"
    save_file({**weights, key: weights[key][:, :16].contiguous(), "spiece_model": spiece_tensor(spiece)}, str(path))
    with pytest.raises(CheckpointError, match=rf"{key.replace('.', '[.]')}: file \[64, 16\], model \[64, 32\]"):
        TextEncoder.load(path)


def test_tokenizer_folder_errors_are_clear(weights, tmp_path):
    path = tmp_path / "umt5.safetensors"
    save_file(weights, str(path))
    with pytest.raises(CheckpointError, match="no tokenizer.json, tokenizer_config.json or spiece.model"):
        TextEncoder.load(path, tokenizer_dir=tmp_path)


# ------------------------------------------------------------------------------------------ inspect
def test_inspect_recognises_each_layout(weights, spiece, tmp_path, capsys):
    stored, _ = fp8_quantise(weights)
    files = {
        "umt5_xxl_fp8_e4m3fn_scaled.safetensors": ({**stored, "spiece_model": spiece_tensor(spiece)}, "hf", True),
        "umt5-xxl-enc-bf16.safetensors": ({to_wan(k): v.bfloat16() for k, v in weights.items()}, "wan-original",
                                          False),
    }
    for name, (tensors, layout, fp8) in files.items():
        save_file(tensors, str(tmp_path / name))
        report = inspect_checkpoint(tmp_path / name)
        assert (report["kind"], report["layout"], report["fp8_scaled"]) == ("umt5", layout, fp8)
        assert report["config"]["text_dim"] == 32 and report["config"]["num_layers"] == 2
        assert report["problems"] == [SIZE_PROBLEM]
        assert report["tokenizer"].startswith("embedded" if fp8 else "not included")
    assert cli_main(["inspect", str(tmp_path / "umt5-xxl-enc-bf16.safetensors")]) == 1  # 1: problems listed
    assert "kind:        umt5" in capsys.readouterr().out


def xxl_header(layout: str) -> dict[str, TensorInfo]:
    """The tensor list of the real UMT5-XXL files (names and shapes as released), without data."""
    d, ff, heads = 4096, 10240, 64
    shapes = {"shared.weight": (256384, d), "encoder.final_layer_norm.weight": (d,)}
    for i in range(24):
        b = f"encoder.block.{i}.layer."
        shapes.update({b + f"0.SelfAttention.{n}.weight": (d, d) for n in "qkvo"})
        shapes.update({b + "0.SelfAttention.relative_attention_bias.weight": (32, heads),
                       b + "0.layer_norm.weight": (d,), b + "1.layer_norm.weight": (d,),
                       b + "1.DenseReluDense.wi_0.weight": (ff, d), b + "1.DenseReluDense.wi_1.weight": (ff, d),
                       b + "1.DenseReluDense.wo.weight": (d, ff)})
    if layout == "wan-original":
        shapes = {to_wan(k): s for k, s in shapes.items()}
    else:
        shapes["spiece_model"] = (4548313,)
    return {k: TensorInfo(Path("x.safetensors"), k, torch.bfloat16, s) for k, s in shapes.items()}


@pytest.mark.parametrize("layout", ["hf", "wan-original"])
def test_real_size_header_has_no_problems(layout):
    report = inspect_report(Path("x.safetensors"), xxl_header(layout), {})
    assert report["problems"] == [] and report["layout"] == layout
    assert report["config"] == {"num_layers": 24, "num_heads": 64, "head_dim": 64, "ffn_dim": 10240,
                                "text_dim": 4096, "vocab_size": 256384}
    assert report["parameters"] == 5_680_910_336  # UMT5-XXL encoder: 5.68 B parameters

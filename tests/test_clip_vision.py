"""CLIP vision stream (spec section 6): squash resize, penultimate layer, 1028-token padding, file layouts.

Reference numbers come from torch's own interpolate, transformers' CLIPVisionModel called directly, and
key names written out here (the Hugging Face names ComfyUI's clip_vision_h.safetensors uses).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModel

from bindweave_core import constants as C
from bindweave_core.checkpoints.safetensors_io import TensorInfo
from bindweave_core.cli import main as cli_main
from bindweave_core.encoders.clip_vision import ClipVisionEncoder, inspect_report
from bindweave_core.errors import CheckpointError, InputError
from bindweave_core.inspection import inspect_checkpoint
from bindweave_core.pipeline import GenerationSettings
from helpers import randomize_

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 16,
         "image_size": 224, "patch_size": 14, "hidden_act": "gelu", "layer_norm_eps": 1e-5, "projection_dim": 24}


@pytest.fixture(scope="module")
def encoder() -> ClipVisionEncoder:
    return ClipVisionEncoder.tiny(seed=0)


@pytest.fixture(scope="module")
def canvases() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(4, 90, 160, 3, generator=g)  # 16:9 canvases, as letterboxed references are


def own_pixels(canvases: torch.Tensor) -> torch.Tensor:
    x = F.interpolate(canvases.permute(0, 3, 1, 2), size=(224, 224), mode="bilinear", antialias=False,
                      align_corners=False)
    return (x - MEAN) / STD


def penultimate(model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]


# ------------------------------------------------------------------------------------------ encoding
def test_canvas_is_squashed_to_224_and_normalised(encoder, canvases):
    pixels = encoder.preprocess(canvases[:2])
    assert pixels.shape == (2, 3, 224, 224)
    torch.testing.assert_close(pixels, own_pixels(canvases[:2]), rtol=0, atol=0)
    as_bytes = (canvases[:1] * 255).round().to(torch.uint8)  # uint8 canvases are scaled to 0..1 first
    torch.testing.assert_close(encoder.preprocess(as_bytes), own_pixels(as_bytes.float() / 255), rtol=0, atol=0)


def bilinear_reference(channel: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Plain bilinear with half-pixel centres and no antialiasing, written out in float64.

    What torchvision 0.16's ``v2.Resize`` does to a float tensor (``antialias="warn"`` means none for
    tensors: docs.pytorch.org/vision/0.16 ``transforms.v2.Resize``), independent of torch's kernel.
    """
    h, w = channel.shape

    def taps(n_out: int, n_in: int):
        x = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, None)
        i0 = np.minimum(np.floor(x).astype(int), n_in - 1)
        return i0, np.minimum(i0 + 1, n_in - 1), x - i0

    y0, y1, fy = taps(out_h, h)
    x0, x1, fx = taps(out_w, w)
    a = channel.astype(np.float64)
    top = a[y0][:, x0] * (1 - fx) + a[y0][:, x1] * fx
    bottom = a[y1][:, x0] * (1 - fx) + a[y1][:, x1] * fx
    return top * (1 - fy[:, None]) + bottom * fy[:, None]


def pil_antialiased(channel: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """PIL's BILINEAR resize of a float image: the triangle filter widened when shrinking (antialiased)."""
    return np.asarray(Image.fromarray(channel.astype(np.float32), mode="F").resize((out_w, out_h), Image.BILINEAR))


@pytest.fixture(scope="module")
def large_canvas() -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    return torch.rand(1, 270, 480, 3, generator=g)  # shrunk to 224 in both directions, as 1280x720 canvases are


@pytest.mark.parametrize("antialias", [False, True])
def test_clip_resize_matches_an_independent_reference(encoder, large_canvas, antialias):
    reference = bilinear_reference if not antialias else pil_antialiased
    channels = large_canvas[0].permute(2, 0, 1).numpy()
    expected = torch.from_numpy(np.stack([reference(c, 224, 224) for c in channels])).float()[None]
    expected = (expected - MEAN) / STD
    pixels = encoder.preprocess(large_canvas, antialias=antialias)
    # float32 source coordinates in torch's kernel: ~5e-5 in 0..1 units, /0.26 after normalising
    torch.testing.assert_close(pixels, expected, rtol=0, atol=3e-4)


def test_clip_resize_default_is_the_official_no_antialias(encoder, large_canvas):
    assert C.CLIP_RESIZE_ANTIALIAS is False
    assert GenerationSettings(prompt="x").clip_resize_antialias is False
    plain, smooth = encoder.preprocess(large_canvas), encoder.preprocess(large_canvas, antialias=True)
    assert torch.equal(plain, encoder.preprocess(large_canvas, antialias=False))
    assert (plain - smooth).abs().max() > 0.5  # the option matters on a shrinking resize
    tokens = encoder.encode_references(large_canvas, antialias=True)
    torch.testing.assert_close(tokens[:, :257], penultimate(encoder.model, smooth), rtol=0, atol=1e-5)


def test_tokens_are_the_penultimate_hidden_states(encoder, canvases):
    tokens = encoder.encode_canvases(canvases[:2])
    assert tokens.shape == (2, 257, 32)
    ref = penultimate(encoder.model, own_pixels(canvases[:2]))
    torch.testing.assert_close(tokens, ref, rtol=0, atol=1e-6)
    with torch.no_grad():
        last = encoder.model(pixel_values=own_pixels(canvases[:2])).last_hidden_state
    assert (tokens - last).abs().max() > 0.1  # not the last layer


@pytest.mark.parametrize("n", [1, 2, 4])
def test_references_are_concatenated_and_zero_padded_to_1028(encoder, canvases, n):
    out = encoder.encode_references(canvases[:n])
    assert out.shape == (1, 1028, 32)
    for i in range(n):  # each reference encoded on its own, as the official loop did
        ref = penultimate(encoder.model, own_pixels(canvases[i:i + 1]))
        torch.testing.assert_close(out[:, 257 * i: 257 * (i + 1)], ref, rtol=0, atol=1e-5)
    assert torch.count_nonzero(out[:, 257 * n:]) == 0
    assert (out[0, : 257 * n].abs().sum(-1) > 0).all()


def test_reference_count_and_shape_are_checked(encoder, canvases):
    with pytest.raises(InputError, match="5 reference images given; BindWeave takes 1 to 4"):
        encoder.encode_references(torch.cat([canvases, canvases[:1]]))
    with pytest.raises(InputError, match="0 reference images given"):
        encoder.encode_references(canvases[:0])
    with pytest.raises(InputError, match=r"\[n, H, W, 3\]"):
        encoder.encode_canvases(canvases.permute(0, 3, 1, 2))


def test_tiny_keeps_257_tokens_and_is_deterministic(canvases):
    a, b, c = ClipVisionEncoder.tiny(seed=4), ClipVisionEncoder.tiny(seed=4), ClipVisionEncoder.tiny(seed=5)
    assert (a.image_size, a.model.config.patch_size, a.image_dim) == (224, 14, 32)
    assert torch.equal(a.encode_canvases(canvases[:1]), b.encode_canvases(canvases[:1]))
    assert not torch.equal(a.encode_canvases(canvases[:1]), c.encode_canvases(canvases[:1]))


# ------------------------------------------------------------------------------------------ layouts
def reference_model(**changes) -> CLIPVisionModel:
    model = randomize_(CLIPVisionModel(CLIPVisionConfig(**{**SMALL, **changes})), seed=9, scale=0.1)
    with torch.no_grad():  # fp16-representable, so the fp16 file holds these exact values
        for p in model.parameters():
            p.copy_(p.half().float())
    return model.eval()


def file_tensors(model: CLIPVisionModel) -> dict[str, torch.Tensor]:
    """The state dict under the names of clip_vision_h.safetensors (``vision_model.*`` + projection)."""
    out = {(k if k.startswith("vision_model.") else "vision_model." + k): v.half() for k, v in
           model.state_dict().items()}
    out["visual_projection.weight"] = torch.randn(SMALL["projection_dim"], SMALL["hidden_size"]).half()
    return out


def test_comfy_clip_vision_h_file(canvases, tmp_path):
    model = reference_model()
    path = tmp_path / "clip_vision_h.safetensors"
    save_file(file_tensors(model), str(path))
    enc = ClipVisionEncoder.load(path, dtype=torch.float32)
    pixels = own_pixels(canvases[:2])
    torch.testing.assert_close(enc.encode_canvases(canvases[:2]), penultimate(model, pixels), rtol=0, atol=1e-5)
    assert enc.model.checkpoint_info.ignored == ["visual_projection.weight"]


def test_diffusers_image_encoder_folder_reads_its_config(canvases, tmp_path):
    model = reference_model(num_attention_heads=4)  # a head count only config.json can tell
    folder = tmp_path / "Wan2.1-I2V-14B-720P-Diffusers" / "image_encoder"
    folder.mkdir(parents=True)
    save_file(file_tensors(model), str(folder / "model.safetensors"))
    config = {**SMALL, "num_attention_heads": 4, "model_type": "clip_vision_model",
              "architectures": ["CLIPVisionModelWithProjection"]}
    (folder / "config.json").write_text(json.dumps(config))
    ref = penultimate(model, own_pixels(canvases[:1]))
    for path in (folder, folder.parent):  # the component folder or the repo root
        enc = ClipVisionEncoder.load(path, dtype=torch.float32)
        assert enc.model.config.num_attention_heads == 4
        torch.testing.assert_close(enc.encode_canvases(canvases[:1]), ref, rtol=0, atol=1e-5)


def test_bf16_load_casts_weights(tmp_path):
    path = tmp_path / "clip_vision_h.safetensors"
    save_file(file_tensors(reference_model()), str(path))
    enc = ClipVisionEncoder.load(path)  # default dtype bfloat16
    assert enc.dtype == torch.bfloat16
    assert enc.encode_references(torch.rand(1, 72, 128, 3)).dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------ errors
def test_wrong_files_are_explained(tmp_path):
    umt5 = tmp_path / "umt5.safetensors"
    save_file({"encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(4, 4)}, str(umt5))
    with pytest.raises(CheckpointError, match="UMT5/T5 text encoder.*clip_vision_h.safetensors"):
        ClipVisionEncoder.load(umt5)
    open_clip = tmp_path / "open_clip.safetensors"
    save_file({"visual.transformer.resblocks.0.attn.in_proj_weight": torch.zeros(12, 4)}, str(open_clip))
    with pytest.raises(CheckpointError, match="incomplete CLIP vision checkpoint"):
        ClipVisionEncoder.load(open_clip)  # open_clip names are read (tests/test_real_files.py), this one is a stub


def test_missing_keys_are_named(tmp_path):
    tensors = file_tensors(reference_model())
    del tensors["vision_model.encoder.layers.2.mlp.fc2.bias"]
    path = tmp_path / "clip.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match=r"missing 1 keys: vision_model\.encoder\.layers\.2\.mlp\.fc2\.bias"
                                              r".*clip_vision_h\.safetensors in models/clip_vision/"):
        ClipVisionEncoder.load(path)


# open_clip names, written out independently from the loader. Source: ComfyUI's
# comfy/clip_vision.py convert_to_transformers (+ comfy/utils.py transformers_convert for the resblocks),
# yzkee/ComfyUI @ 783545f689a0af730065994b46b382ae24844c99; open_clip's VisionTransformer module names.
OPEN_CLIP_TOP = {"embeddings.class_embedding": "class_embedding", "embeddings.patch_embedding.weight": "conv1.weight",
                 "embeddings.position_embedding.weight": "positional_embedding",
                 "pre_layrnorm.weight": "ln_pre.weight", "pre_layrnorm.bias": "ln_pre.bias",
                 "post_layernorm.weight": "ln_post.weight", "post_layernorm.bias": "ln_post.bias"}
OPEN_CLIP_BLOCK = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def open_clip_tensors(model: CLIPVisionModel, prefix: str = "") -> dict[str, torch.Tensor]:
    """A full open_clip ViT file: visual tower (packed qkv ``in_proj``), ``visual.proj``, a text tower stub."""
    sd = {k.removeprefix("vision_model."): v.half() for k, v in model.state_dict().items()}
    out = {prefix + "visual." + new: sd.pop(old) for old, new in OPEN_CLIP_TOP.items()}
    for i in range(SMALL["num_hidden_layers"]):
        hf, oc = f"encoder.layers.{i}.", f"{prefix}visual.transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            out[oc + f"attn.in_proj_{leaf}"] = torch.cat([sd.pop(hf + f"self_attn.{n}_proj.{leaf}") for n in "qkv"])
            for old, new in OPEN_CLIP_BLOCK.items():
                out[oc + f"{new}.{leaf}"] = sd.pop(hf + f"{old}.{leaf}")
    assert set(sd) <= {"embeddings.position_ids"}, sd.keys()
    out[prefix + "visual.proj"] = torch.randn(SMALL["hidden_size"], SMALL["projection_dim"]).half()
    # the text tower and contrastive scale of a full open_clip checkpoint (not used by the vision tower)
    out |= {prefix + "token_embedding.weight": torch.randn(10, 8).half(),
            prefix + "positional_embedding": torch.randn(7, 8).half(),
            prefix + "transformer.resblocks.0.attn.in_proj_weight": torch.randn(24, 8).half(),
            prefix + "ln_final.weight": torch.ones(8).half(), prefix + "text_projection": torch.randn(8, 8).half(),
            prefix + "logit_scale": torch.ones(()).half()}
    return out


@pytest.mark.parametrize("prefix", ["", "clip."])
def test_open_clip_file_loads_like_the_hf_file(canvases, tmp_path, caplog, prefix):
    model = reference_model()
    save_file(file_tensors(model), str(tmp_path / "hf.safetensors"))
    save_file(open_clip_tensors(model, prefix), str(tmp_path / "open_clip.safetensors"))
    hf = ClipVisionEncoder.load(tmp_path / "hf.safetensors", dtype=torch.float32)
    oc = ClipVisionEncoder.load(tmp_path / "open_clip.safetensors", dtype=torch.float32)
    assert oc.model.checkpoint_info.layout == "open-clip" and not oc.model.checkpoint_info.unexpected
    assert "unexpected" not in caplog.text
    hf_sd = hf.model.state_dict()
    for key, value in oc.model.state_dict().items():
        assert torch.equal(value, hf_sd[key]), key
    torch.testing.assert_close(oc.encode_canvases(canvases[:2]), hf.encode_canvases(canvases[:2]), rtol=0, atol=1e-6)
    torch.testing.assert_close(oc.encode_canvases(canvases[:2]), penultimate(model, own_pixels(canvases[:2])),
                               rtol=0, atol=1e-5)
    report = inspect_checkpoint(tmp_path / "open_clip.safetensors")
    assert (report["kind"], report["layout"], report["parameters"]) == (
        "clip_vision", "open-clip", sum(p.numel() for p in model.parameters()))


@pytest.mark.parametrize("layout", ["hf", "open_clip"])
def test_key_problems_missing_misshapen_and_extra(tmp_path, caplog, layout):
    model = reference_model()
    tensors = file_tensors(model) if layout == "hf" else open_clip_tensors(model)
    fc2 = ("vision_model.encoder.layers.2.mlp.fc2.bias" if layout == "hf"
           else "visual.transformer.resblocks.2.mlp.c_proj.bias")
    fc1 = ("vision_model.encoder.layers.1.mlp.fc1.weight" if layout == "hf"
           else "visual.transformer.resblocks.1.mlp.c_fc.weight")
    missing = {k: v for k, v in tensors.items() if k != fc2}
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing 1 keys: vision_model\.encoder\.layers\.2\.mlp\.fc2\.bias"):
        ClipVisionEncoder.load(tmp_path / "missing.safetensors")
    save_file({**tensors, fc1: tensors[fc1][:, :16].contiguous()}, str(tmp_path / "shape.safetensors"))
    with pytest.raises(CheckpointError, match=rf"{re.escape(fc1)}: file \[64, 16\], model \[64, 32\]"):
        ClipVisionEncoder.load(tmp_path / "shape.safetensors")
    save_file({**tensors, "visual.extra_head.weight": torch.zeros(2)}, str(tmp_path / "extra.safetensors"))
    enc = ClipVisionEncoder.load(tmp_path / "extra.safetensors", dtype=torch.float32)
    assert "unexpected 1 keys: visual.extra_head.weight" in caplog.text
    assert enc.model.checkpoint_info.unexpected == ["visual.extra_head.weight"]


# ------------------------------------------------------------------------------------------ inspect
def test_inspect_recognises_the_file(tmp_path, capsys):
    path = tmp_path / "clip_vision_h.safetensors"
    save_file(file_tensors(reference_model()), str(path))
    report = inspect_checkpoint(path)
    assert (report["kind"], report["layout"]) == ("clip_vision", "hf")
    assert report["config"]["image_dim"] == 32 and report["config"]["num_layers"] == 3
    assert report["problems"] == [("not the CLIP ViT-H/14 BindWeave needs: hidden_size 32 (ViT-H/14: 1280), "
                                   "intermediate_size 64 (ViT-H/14: 5120), num_hidden_layers 3 (ViT-H/14: 32)")]
    assert cli_main(["inspect", str(path)]) == 1
    assert "kind:        clip_vision" in capsys.readouterr().out


def test_real_size_header_has_no_problems():
    """clip_vision_h.safetensors' tensor list (names and shapes as released), without data."""
    d, ff = 1280, 5120
    shapes = {"vision_model.embeddings.class_embedding": (d,),
              "vision_model.embeddings.patch_embedding.weight": (d, 3, 14, 14),
              "vision_model.embeddings.position_embedding.weight": (257, d),
              "vision_model.pre_layrnorm.weight": (d,), "vision_model.pre_layrnorm.bias": (d,),
              "vision_model.post_layernorm.weight": (d,), "vision_model.post_layernorm.bias": (d,),
              "visual_projection.weight": (1024, d)}
    for i in range(32):
        b = f"vision_model.encoder.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes.update({b + f"self_attn.{n}.weight": (d, d), b + f"self_attn.{n}.bias": (d,)})
        shapes.update({b + "mlp.fc1.weight": (ff, d), b + "mlp.fc1.bias": (ff,), b + "mlp.fc2.weight": (d, ff),
                       b + "mlp.fc2.bias": (d,)})
        for n in ("layer_norm1", "layer_norm2"):
            shapes.update({b + f"{n}.weight": (d,), b + f"{n}.bias": (d,)})
    infos = {k: TensorInfo(Path("x.safetensors"), k, torch.float16, s) for k, s in shapes.items()}
    report = inspect_report(Path("x.safetensors"), infos, {})
    assert report["problems"] == []
    assert report["config"] == {"num_layers": 32, "num_heads": 16, "head_dim": 80, "ffn_dim": 5120, "image_dim": 1280,
                                "image_size": 224, "patch_size": 14}
    assert report["parameters"] == 630_766_080  # the ViT-H/14 tower without its projection

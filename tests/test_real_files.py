"""Model files as users download them: every DiT key layout, fp8 scale variants, GGUF, key checks, inspect.

Where the key names, markers and formats come from (public code that reads the real files):

* original Wan DiT names (``blocks.N.self_attn.q.weight``, ``head.modulation``) and the
  ``model.diffusion_model.`` / ``model.`` prefixes: ComfyUI (snapshot yzkee/ComfyUI @
  783545f689a0af730065994b46b382ae24844c99) comfy/model_detection.py (``head.modulation`` -> wan2.1),
  comfy/sd.py; original -> diffusers renaming: diffusers 0.42.1 loaders/single_file_utils.py
  ``convert_wan_transformer_to_diffusers`` (installed package).
* ``scaled_fp8`` marker, ``scale_weight``, ``scale_input``, the ``_quantization_metadata`` header entry:
  yzkee/ComfyUI @ 783545f6... comfy/utils.py ``convert_old_quants``.
* ``comfy_quant`` JSON per layer, ``weight_scale`` / ``input_scale``, fp8 stored as uint8 bytes, the other
  formats (nvfp4 with ``weight_scale_2``, mxfp8, int8_tensorwise ...): yzkee/ComfyUI @ 783545f6...
  comfy/ops.py (mixed-precision ``_load_from_state_dict``) and comfy/quant_ops.py ``QUANT_ALGOS``.
* Wan GGUF files: city96/ComfyUI-GGUF @ 795e45156ece99afbc3efef911e63fcb46e6a20d tools/convert.py
  (``ModelWan``, ``strip_prefix``, ``handle_tensors``: original names without prefix; 1-D, small and
  ``.modulation`` tensors F32; F16 where a row does not split into blocks), tools/fix_5d_tensors.py
  (5-D ``patch_embedding`` re-added as F32), loader.py (``gguf_sd_loader``, ``get_orig_shape``:
  ``comfy.gguf.orig_shape.<name>``, ggml shapes reversed).
* GGUF block layouts and quantisation: the gguf package 0.19.0 (PyPI), gguf/quants.py.

Per-output-channel (``[out, 1]``) and 128 x 128 block fp8 scales are the layouts of compressed-tensors
"channel" and DeepSeek-style ``weight_scale_inv`` files; they are written here from that description.
"""

from __future__ import annotations

import json
import logging

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_dit_checkpoints import BLOCK_LINEAR, to_original

from bindweave_core.checkpoints.materialize import expand_scale
from bindweave_core.cli import main as cli_main
from bindweave_core.config import PRESETS, DiTConfig
from bindweave_core.dit import build_dit, count_parameters
from bindweave_core.dit.gguf_linear import GGUFLinear
from bindweave_core.dit.loading import load_dit, scan_dit
from bindweave_core.errors import CheckpointError
from bindweave_core.inspection import inspect_checkpoint
from helpers import randomize_, tiny_dit_inputs

TINY = PRESETS["tiny"]
FP8 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
QT = gguf.GGMLQuantizationType
# K-quant rows hold 256 values: a DiT of width 256 lets every block linear be quantised.
GGUF_CFG = DiTConfig(family="bindweave", num_layers=1, num_heads=2, head_dim=128, ffn_dim=512, in_channels=36,
                     text_dim=32, freq_dim=32, image_dim=32, planner_dim=64)


def run(model, inputs):
    """The model's output on one thread, its tensors first copied into fresh memory: memory-mapped tensors are
    not 64-byte aligned and threads split sums by address, which changes the last bits (~1e-6), not the values."""
    for module in model.modules():
        for name, t in list(module._parameters.items()) + list(module._buffers.items()):
            if t is not None:
                setattr(module, name, torch.nn.Parameter(t.clone(), requires_grad=False)
                        if name in module._parameters else t.clone())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            return model(**inputs)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference():
    return randomize_(build_dit(TINY), seed=31)


@pytest.fixture(scope="module")
def inputs():
    return tiny_dit_inputs()


@pytest.fixture(scope="module")
def reference_file(reference, tmp_path_factory):
    """The reference layout: a diffusers single file of the reference weights."""
    path = tmp_path_factory.mktemp("ref") / "diffusion_pytorch_model.safetensors"
    save_file(reference.state_dict(), str(path))
    return path


@pytest.fixture(scope="module")
def reference_out(reference_file, inputs):
    return run(load_dit(reference_file, dtype=torch.float32), inputs)


def with_weights(values: dict[str, torch.Tensor], cfg: DiTConfig = TINY):
    model = build_dit(cfg)
    model.load_state_dict(values)
    return model.eval()


# ------------------------------------------------------------------------------------ DiT layouts
@pytest.mark.parametrize("layout,prefix", [("diffusers", "model.diffusion_model."), ("diffusers", "model."),
                                           ("original", ""), ("original", "model.diffusion_model."),
                                           ("original", "model.")])
def test_dit_layouts_and_prefixes_load_like_the_reference(reference, reference_file, reference_out, inputs,
                                                          tmp_path, caplog, layout, prefix):
    sd = reference.state_dict()
    tensors = {prefix + (to_original(k) if layout == "original" else k): v for k, v in sd.items()}
    # harmless extras real files carry: ComfyUI's marker (outside the wrapper prefix) and activation scales
    tensors["scaled_fp8"] = torch.empty(0, dtype=FP8)
    tensors[prefix + "blocks.0.self_attn.q.scale_input"] = torch.ones(())
    path = tmp_path / "dit.safetensors"
    save_file(tensors, str(path))
    with caplog.at_level(logging.WARNING, logger="BindWeave"):
        model = load_dit(path, dtype=torch.float32)
    assert "unexpected" not in caplog.text  # known extras are skipped silently
    assert model.checkpoint_info.layout == ("wan-original" if layout == "original" else "diffusers")
    assert "scaled_fp8" in model.checkpoint_info.ignored
    for key, value in model.state_dict().items():
        assert torch.equal(value, sd[key]), key
    torch.testing.assert_close(run(model, inputs), reference_out, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------ key checks
def test_missing_tensor_is_named(reference, tmp_path):
    sd = {to_original(k): v for k, v in reference.state_dict().items()}
    del sd["blocks.1.cross_attn.k_img.weight"]
    save_file(sd, str(tmp_path / "dit.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing 1 keys: blocks\.1\.attn2\.add_k_proj\.weight"):
        load_dit(tmp_path / "dit.safetensors")


def test_wrongly_shaped_tensor_is_named_with_both_shapes(reference, tmp_path):
    sd = {to_original(k): v for k, v in reference.state_dict().items()}
    sd["blocks.1.ffn.2.weight"] = sd["blocks.1.ffn.2.weight"][:, :100].contiguous()
    save_file(sd, str(tmp_path / "dit.safetensors"))
    with pytest.raises(CheckpointError, match=r"blocks\.1\.ffn\.2\.weight: file \[64, 100\], model \[64, 128\]"):
        load_dit(tmp_path / "dit.safetensors")


def test_unknown_extra_is_warned_and_the_load_goes_on(reference, reference_out, inputs, tmp_path, caplog):
    sd = {to_original(k): v for k, v in reference.state_dict().items()}
    sd["blocks.0.extra_adapter.weight"] = torch.zeros(2)
    save_file(sd, str(tmp_path / "dit.safetensors"))
    with caplog.at_level(logging.WARNING, logger="BindWeave"):
        model = load_dit(tmp_path / "dit.safetensors", dtype=torch.float32)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "unexpected 1 keys: blocks.0.extra_adapter.weight" in warnings[0]
    torch.testing.assert_close(run(model, inputs), reference_out, rtol=0, atol=1e-6)
    assert inspect_checkpoint(tmp_path / "dit.safetensors")["extras"] == [
        "unexpected 1 keys: blocks.0.extra_adapter.weight"]


# ------------------------------------------------------------------------------------ fp8 scales
def quantise(w: torch.Tensor, kind: str, dtype=FP8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(stored fp8, scale as stored, dequantised value) for one weight, by the test's own arithmetic."""
    top = torch.finfo(dtype).max
    if kind == "tensor":
        scale = w.abs().max() / top
        full = scale
    elif kind == "channel":
        scale = w.abs().amax(dim=1, keepdim=True) / top  # [out, 1]
        full = scale
    else:  # 32 x 32 blocks
        blocks = w.reshape(w.shape[0] // 32, 32, w.shape[1] // 32, 32)
        scale = blocks.abs().amax(dim=(1, 3)) / top  # [out / 32, in / 32]
        full = scale[:, None, :, None].expand_as(blocks).reshape(w.shape)
    stored = (w / full).to(dtype)
    return stored, scale.reshape(1) if kind == "tensor" else scale, stored.float() * full


@pytest.mark.parametrize("kind,suffix", [("tensor", "scale_weight"), ("channel", "weight_scale"),
                                         ("block", "weight_scale_inv")])
def test_fp8_scale_layouts_are_dequantised(reference, inputs, tmp_path, kind, suffix):
    sd = reference.state_dict()
    tensors, expected = {}, dict(sd)
    for key, value in sd.items():
        name = "model.diffusion_model." + to_original(key)
        if BLOCK_LINEAR.match(to_original(key)):
            stored, scale, expected[key] = quantise(value, kind)
            tensors[name], tensors[name[: -len("weight")] + suffix] = stored, scale
        else:
            tensors[name] = value
    tensors["model.diffusion_model.scaled_fp8"] = torch.empty(0, dtype=FP8)
    save_file(tensors, str(tmp_path / "fp8.safetensors"))
    model = load_dit(tmp_path / "fp8.safetensors", dtype=torch.float32)
    ckpt = model.checkpoint_info
    assert ckpt.fp8_scale_kinds == [{"tensor": "per-tensor", "channel": "per-channel", "block": "block"}[kind]]
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)
    ref = with_weights(expected)
    torch.testing.assert_close(run(model, inputs), run(ref, inputs), rtol=0, atol=1e-5)
    # fp8 storage keeps one scale per tensor: finer scales are requantised, within e4m3's error
    fp8 = load_dit(tmp_path / "fp8.safetensors", dtype=torch.float32, weight_format="fp8")
    out, want = run(fp8, inputs), run(ref, inputs)
    assert (out - want).norm() / want.norm() < 0.05


def test_block_scales_of_128_cover_ragged_edges():
    w = torch.randn(300, 200)
    scale = torch.rand(3, 2) + 0.5  # ceil(300 / 128) x ceil(200 / 128)
    full = expand_scale(scale, (300, 200))
    assert full.shape == (300, 200)
    assert full[127, 127] == scale[0, 0] and full[128, 127] == scale[1, 0] and full[299, 199] == scale[2, 1]
    with pytest.raises(CheckpointError, match="fp8 scale of shape"):
        expand_scale(torch.ones(7), tuple(w.shape))


def comfy_quant(conf: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(conf).encode("utf-8")), dtype=torch.uint8)


def test_comfy_mixed_precision_file_is_dequantised(reference, inputs, tmp_path):
    """ComfyUI's per-layer files: ``comfy_quant`` JSON, ``weight_scale`` and ``input_scale`` per quantised layer;
    other layers in full precision. e4m3fn and e5m2 layers mixed, some e4m3fn weights stored as uint8 bytes."""
    sd = reference.state_dict()
    tensors, expected = {}, dict(sd)
    for i, (key, value) in enumerate(sorted(sd.items())):
        name = to_original(key)
        if BLOCK_LINEAR.match(name) and i % 3:
            fmt, dtype = ("float8_e5m2", E5M2) if i % 3 == 2 else ("float8_e4m3fn", FP8)
            stored, scale, expected[key] = quantise(value, "tensor", dtype)
            layer = name[: -len(".weight")]
            if fmt == "float8_e4m3fn" and i % 4 == 1:
                stored = stored.view(torch.uint8)  # "legacy uint8-on-disk" fp8, which comfy/ops.py views as fp8
            tensors |= {name: stored, layer + ".weight_scale": scale.reshape(()),
                        layer + ".input_scale": torch.tensor(0.5), layer + ".comfy_quant": comfy_quant({"format": fmt})}
        else:
            tensors[name] = value.to(torch.bfloat16)
            expected[key] = value.to(torch.bfloat16).float()
    save_file(tensors, str(tmp_path / "mixed.safetensors"))
    model = load_dit(tmp_path / "mixed.safetensors", dtype=torch.float32)
    assert not model.checkpoint_info.unexpected
    torch.testing.assert_close(run(model, inputs), run(with_weights(expected), inputs), rtol=0, atol=1e-5)


@pytest.mark.parametrize("extra,fmt", [
    ({"blocks.0.self_attn.q.comfy_quant": comfy_quant({"format": "nvfp4"}),
      "blocks.0.self_attn.q.weight_scale_2": torch.ones(())}, "nvfp4"),
    ({"blocks.0.self_attn.q.comfy_quant": comfy_quant({"format": "mxfp8"})}, "mxfp8"),
    ({"blocks.0.self_attn.q.qweight": torch.zeros(8, 64, dtype=torch.int32),
      "blocks.0.self_attn.q.qzeros": torch.zeros(1, 8, dtype=torch.int32)}, "int4 GPTQ/AWQ"),
])
def test_unreadable_quantisations_name_the_format_and_the_file_to_get(reference, tmp_path, extra, fmt):
    sd = {to_original(k): v for k, v in reference.state_dict().items()}
    save_file({**sd, **extra}, str(tmp_path / "quant.safetensors"))
    with pytest.raises(CheckpointError, match=rf"quantised as {fmt}.*does not read.*fp8 \(e4m3fn"):
        load_dit(tmp_path / "quant.safetensors")


def test_quantisation_described_in_the_header_is_checked_too(reference, tmp_path):
    """ComfyUI also reads a ``_quantization_metadata`` header entry (comfy/utils.py convert_old_quants)."""
    sd = {to_original(k): v for k, v in reference.state_dict().items()}
    layers = {"blocks.0.ffn.0": {"format": "int8_tensorwise"}}
    save_file(sd, str(tmp_path / "int8.safetensors"), metadata={"_quantization_metadata": json.dumps({"layers": layers})})
    with pytest.raises(CheckpointError, match=r"quantised as int8_tensorwise \(1 layers, e\.g\. blocks\.0\.ffn\.0\)"):
        inspect_checkpoint(tmp_path / "int8.safetensors")


# ------------------------------------------------------------------------------------ GGUF
def craft_k_quant(rows: int, cols: int, qtype, rng: np.random.Generator) -> np.ndarray:
    """Random K-quant blocks with small, finite float16 super-block scales (gguf cannot quantise K types)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    d = rng.uniform(1e-3, 4e-3, size=(rows, cols // block, 2)).astype(np.float16).view(np.uint8)
    if qtype == QT.Q6_K:  # ... ql, qh, int8 scales, then d
        raw[..., -2:] = d[..., 0:2]
    else:  # Q4_K / Q5_K: d, dmin, then 6-bit scales and the quants
        raw[..., 0:4] = d.reshape(rows, cols // block, 4)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q6_K, QT.Q5_K, QT.Q4_K], ids=lambda q: q.name)
def test_torch_dequantisation_equals_gguf_numpy(qtype):
    from bindweave_core.checkpoints.gguf_io import dequantize

    rng = np.random.default_rng(3)
    if qtype == QT.Q8_0:
        raw = gguf.quants.quantize(rng.standard_normal((8, 512)).astype(np.float32), qtype)
    else:
        raw = craft_k_quant(8, 512, qtype, rng)
    want = torch.from_numpy(gguf.quants.dequantize(raw, qtype).copy())
    got = dequantize(torch.from_numpy(raw.reshape(-1).copy()), qtype.name, (8, 512))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def write_wan_gguf(model, path, qtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """A Wan GGUF as ComfyUI-GGUF's convert.py writes it; returns the values it stores (torch, float32)."""
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(path=None, arch="wan")
    stored = {}
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    for key, value in model.state_dict().items():
        name, data = to_original(key), value.numpy()
        if data.ndim == 2 and data.shape[1] % block == 0 and data.size > 1024 and not name.endswith("modulation"):
            if qtype == QT.Q8_0:
                raw = gguf.quants.quantize(data, qtype)
            else:
                raw = craft_k_quant(*data.shape, qtype, rng)
            writer.add_tensor(name, raw, raw_dtype=qtype)
            stored[key] = torch.from_numpy(gguf.quants.dequantize(raw, qtype).copy())
        elif data.ndim == 1 or data.size <= 1024 or name.endswith("modulation") or data.ndim > 4:
            writer.add_tensor(name, data.astype(np.float32))  # 1-D, small, modulation and 5-D: F32
            stored[key] = value.clone()
        else:  # what convert.py falls back to when a row does not split into blocks
            writer.add_tensor(name, data.astype(np.float16))
            stored[key] = value.half().float()
    writer.write_header_to_file(path=str(path))
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


@pytest.fixture(scope="module")
def gguf_reference():
    return randomize_(build_dit(GGUF_CFG), seed=41, scale=0.05)


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q6_K, QT.Q5_K, QT.Q4_K], ids=lambda q: q.name)
def test_gguf_dit_dequantises_layer_by_layer_like_the_reference(gguf_reference, inputs, tmp_path, qtype):
    path = tmp_path / f"wan2.1-i2v-14b-bindweave-{qtype.name}.gguf"
    stored = write_wan_gguf(gguf_reference, path, qtype)
    # 256 wide: no known model has that width, so the head size comes from the config (refused without one)
    with pytest.raises(CheckpointError, match="cannot tell the head size of a DiT 256 wide"):
        load_dit(path)
    model = load_dit(path, dtype=torch.float32, config=GGUF_CFG)
    ckpt = model.checkpoint_info
    assert ckpt.layout == "wan-original" and ckpt.family == "bindweave" and ckpt.config == GGUF_CFG
    quantised = [m for m in model.modules() if isinstance(m, GGUFLinear)]
    assert len(quantised) >= 12 and all(m.qweight.dtype == torch.uint8 and m.quant == qtype.name for m in quantised)
    # only raw bytes are held: no float copy of a quantised weight anywhere in the model
    assert all(not n.endswith(".weight") or "ffn" not in n for n, _ in model.named_parameters())
    # the reference layout: a diffusers safetensors file of the values the GGUF file stores
    save_file(stored, str(tmp_path / "reference.safetensors"))
    ref = load_dit(tmp_path / "reference.safetensors", dtype=torch.float32, config=GGUF_CFG)
    torch.testing.assert_close(run(model, inputs), run(ref, inputs), rtol=0, atol=1e-5)
    if qtype == QT.Q8_0:
        # Q8_0's documented error: one scale d = amax / 127 per 32 values, |error| <= d / 2, plus the rounding
        # of d to float16 (relative 2^-11) times the largest quant (127)
        sd = gguf_reference.state_dict()
        for name, module in model.named_modules():
            if isinstance(module, GGUFLinear):
                w = sd[name + ".weight"]
                d = w.reshape(-1, 32).abs().amax(dim=1, keepdim=True) / 127
                err = (module.dequantized_weight(torch.float32) - w).reshape(-1, 32).abs()
                assert (err <= d / 2 + 127 * d * 2.0**-11 + 1e-7).all(), name


def test_gguf_with_orig_shape_metadata_and_bf16_tensors(gguf_reference, tmp_path, inputs):
    """ComfyUI-GGUF reshapes some tensors for quantisation and records ``comfy.gguf.orig_shape.<name>``."""
    writer = gguf.GGUFWriter(path=None, arch="wan")
    stored = {}
    for key, value in gguf_reference.state_dict().items():
        name, data = to_original(key), value.numpy().astype(np.float32)
        if name == "blocks.0.ffn.0.weight":  # [512, 256] stored as [256, 512] rows of Q8_0
            writer.add_array(f"comfy.gguf.orig_shape.{name}", list(data.shape))
            raw = gguf.quants.quantize(data.reshape(256, 512), QT.Q8_0)
            writer.add_tensor(name, raw, raw_dtype=QT.Q8_0)
            stored[key] = torch.from_numpy(gguf.quants.dequantize(raw, QT.Q8_0).copy()).reshape(value.shape)
        elif data.ndim == 2:
            writer.add_tensor(name, gguf.quants.quantize(data, QT.BF16), raw_dtype=QT.BF16)
            stored[key] = value.bfloat16().float()
        else:
            writer.add_tensor(name, data)
            stored[key] = value.clone()
    path = tmp_path / "reshaped.gguf"
    writer.write_header_to_file(path=str(path))
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    model = load_dit(path, dtype=torch.float32, config=GGUF_CFG)  # 256 wide: no known model, so a config
    torch.testing.assert_close(run(model, inputs), run(with_weights(stored, GGUF_CFG), inputs), rtol=0, atol=1e-5)


def test_gguf_in_bf16_and_truncated_gguf(gguf_reference, inputs, tmp_path):
    path = tmp_path / "dit-Q8_0.gguf"
    write_wan_gguf(gguf_reference, path, QT.Q8_0)
    fp32, bf16 = load_dit(path, dtype=torch.float32, config=GGUF_CFG), load_dit(path, dtype=torch.bfloat16, config=GGUF_CFG)
    assert bf16.patch_embedding.weight.dtype == torch.bfloat16
    assert all(m.qweight.dtype == torch.uint8 for m in bf16.modules() if isinstance(m, GGUFLinear))
    want = run(fp32, inputs)
    got = run(bf16, {k: v.to(torch.bfloat16) if v.is_floating_point() and k != "timestep" else v
                     for k, v in inputs.items()})
    assert (got.float() - want).norm() / want.norm() < 0.02
    data = path.read_bytes()
    (tmp_path / "short.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="short.gguf: not a readable GGUF file.*download it again"):
        load_dit(tmp_path / "short.gguf", config=GGUF_CFG)


def test_gguf_unsupported_type_is_named(gguf_reference, tmp_path):
    writer = gguf.GGUFWriter(path=None, arch="wan")
    for key, value in gguf_reference.state_dict().items():
        data = value.numpy().astype(np.float32)
        if key == "blocks.0.attn1.to_q.weight":
            writer.add_tensor(to_original(key), np.zeros((256, 256 // 256 * 66), dtype=np.uint8), raw_dtype=QT.IQ2_XXS)
        else:
            writer.add_tensor(to_original(key), data)
    writer.write_header_to_file(path=str(tmp_path / "iq2.gguf"))
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match=r"GGUF quantisation type IQ2_XXS .*blocks\.0\.self_attn\.q\.weight.*Q8_0"):
        load_dit(tmp_path / "iq2.gguf")


# ------------------------------------------------------------------------------------ inspect
@pytest.fixture
def cli(capsys):
    """``python -m bindweave_core inspect ARGS`` in this process: (exit code, stdout, stderr)."""
    def call(*args: str) -> tuple[int, str, str]:
        code = cli_main(["inspect", *args])
        out = capsys.readouterr()
        return code, out.out, out.err
    return call


def test_inspect_reports_layout_quantisation_and_parameters(reference, gguf_reference, tmp_path, cli):
    n = count_parameters(reference)
    sd = reference.state_dict()
    save_file({"model.diffusion_model." + to_original(k): v for k, v in sd.items()}, str(tmp_path / "orig.safetensors"))
    tensors = {}
    for key, value in sd.items():
        name = to_original(key)
        if BLOCK_LINEAR.match(name):
            stored, scale, _ = quantise(value, "channel")
            tensors |= {name: stored, name[: -len("weight")] + "weight_scale": scale}
        else:
            tensors[name] = value
    save_file(tensors, str(tmp_path / "channel_fp8.safetensors"))
    write_wan_gguf(gguf_reference, tmp_path / "dit-Q4_K_M.gguf", QT.Q4_K)

    rep = inspect_checkpoint(tmp_path / "orig.safetensors")
    assert (rep["layout"], rep["parameters"], rep["problems"], rep["format"]) == ("wan-original", n, [], "safetensors")
    rep = inspect_checkpoint(tmp_path / "channel_fp8.safetensors")
    assert rep["fp8_scales"] == ["per-channel"] and rep["parameters"] == n
    # the GGUF test model is 256 wide, a width no known model has: inspect names the missing head size
    rep = inspect_checkpoint(tmp_path / "dit-Q4_K_M.gguf")
    assert rep["format"] == "gguf" and any("cannot tell the head size of a DiT 256 wide" in p for p in rep["problems"])
    ckpt = scan_dit(tmp_path / "dit-Q4_K_M.gguf", GGUF_CFG)
    assert ckpt.layout == "wan-original" and ckpt.parameter_count == count_parameters(gguf_reference)
    assert ckpt.gguf_types["Q4_K"] >= 12 and ckpt.gguf_types["float32"] > 0

    code, out, err = cli(str(tmp_path / "channel_fp8.safetensors"))
    assert code == 0, err
    assert "quantised:   fp8 weights with per-channel scales" in out and f"{n:,}" in out
    code, out, err = cli(str(tmp_path / "dit-Q4_K_M.gguf"))
    assert "format:      gguf" in out and "cannot tell the head size" in out + err


def test_inspect_says_not_recognised(tmp_path, cli):
    save_file({"encoder.some_layer.weight": torch.zeros(3, 3)}, str(tmp_path / "unknown.safetensors"))
    code, out, _ = cli(str(tmp_path / "unknown.safetensors"))
    assert code != 0 and "not recognised" in out and "encoder.some_layer.weight" in out
    # judged by content: random bytes named .bin are not "a pickled checkpoint", nor a .gguf a GGUF file
    for name in ("random.bin", "random.gguf", "random.safetensors", "random.pt"):
        (tmp_path / name).write_bytes(np.random.default_rng(0).integers(1, 127, 4096, dtype=np.uint8).tobytes())
        code, out, err = cli(str(tmp_path / name))
        assert code != 0 and "not recognised" in err and "pickle" not in err, name
        assert "4,096 bytes starting with" in err

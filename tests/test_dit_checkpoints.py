"""DiT checkpoints in every layout users have load to the same model; bad files give clear errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from bindweave_core.checkpoints.writers import save_sharded
from bindweave_core.config import PRESETS
from bindweave_core.dit import build_dit, count_parameters
from bindweave_core.dit.loading import dit_from_state_dict, load_dit, scan_dit
from bindweave_core.errors import CheckpointError
from bindweave_core.fp8 import FP8Linear
from bindweave_core.inspection import inspect_checkpoint
from helpers import REPO, randomize_, tiny_dit_inputs

TINY = PRESETS["tiny"]

# The original Wan module names, written out independently of the loader's conversion.
ORIGINAL_NAMES = [
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.text_projector\.linear_1\.", "text_projection.0."),
    (r"^condition_embedder\.text_projector\.linear_2\.", "text_projection.2."),
    (r"^condition_embedder\.image_embedder\.norm1\.", "img_emb.proj.0."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.0\.proj\.", "img_emb.proj.1."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.2\.", "img_emb.proj.3."),
    (r"^condition_embedder\.image_embedder\.norm2\.", "img_emb.proj.4."),
    (r"\.attn1\.", ".self_attn."),
    (r"\.attn2\.", ".cross_attn."),
    (r"\.to_q\.", ".q."), (r"\.to_k\.", ".k."), (r"\.to_v\.", ".v."), (r"\.to_out\.0\.", ".o."),
    (r"\.add_k_proj\.", ".k_img."), (r"\.add_v_proj\.", ".v_img."), (r"\.norm_added_k\.", ".norm_k_img."),
    (r"^(blocks\.\d+)\.norm2\.", r"\1.norm3."),
    (r"\.ffn\.net\.0\.proj\.", ".ffn.0."), (r"\.ffn\.net\.2\.", ".ffn.2."),
    (r"^(blocks\.\d+)\.scale_shift_table$", r"\1.modulation"),
    (r"^proj_out\.", "head.head."),
    (r"^scale_shift_table$", "head.modulation"),
]
BLOCK_LINEAR = re.compile(r"^blocks\.\d+\.(self_attn|cross_attn)\.(q|k|v|o|k_img|v_img)\.weight$|"
                          r"^blocks\.\d+\.ffn\.(0|2)\.weight$")


def to_original(key: str) -> str:
    for pattern, repl in ORIGINAL_NAMES:
        key = re.sub(pattern, repl, key)
    return key


@pytest.fixture(scope="module")
def reference():
    return randomize_(build_dit(TINY), seed=21)


@pytest.fixture(scope="module")
def inputs():
    return tiny_dit_inputs()


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs)


def assert_same_model(model, reference, inputs):
    """Bit-identical weights; outputs equal up to kernel rounding (memory-mapped tensors are not
    64-byte aligned, which changes the CPU's vectorised summation order in the last bits)."""
    expected = reference.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key
    torch.testing.assert_close(run(model, inputs), run(reference, inputs), rtol=0, atol=1e-5)


def write_original(model, path, prefix="", fp8=False):
    tensors = {}
    for key, value in model.state_dict().items():
        name = to_original(key)
        if fp8 and BLOCK_LINEAR.match(name):
            scale = value.abs().max() / 448.0
            tensors[prefix + name] = (value / scale).to(torch.float8_e4m3fn)
            tensors[prefix + name.replace(".weight", ".scale_weight")] = scale.reshape(1)
        else:
            tensors[prefix + name] = value
    if fp8:
        tensors["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_file(tensors, str(path))
    return tensors


def dequantized_copy(model, tensors, prefix=""):
    """The reference model with its block linears replaced by fp8 weight x scale (the test's own math)."""
    copy = build_dit(TINY)
    sd = dict(model.state_dict())
    for key in sd:
        name = prefix + to_original(key)
        scale_name = name[: -len(".weight")] + ".scale_weight"
        if name.endswith(".weight") and scale_name in tensors:
            sd[key] = tensors[name].float() * tensors[scale_name].float()
    copy.load_state_dict(sd)
    return copy


# ------------------------------------------------------------------------------------ layouts
def test_sharded_diffusers_directory(reference, inputs, tmp_path):
    save_sharded(reference.state_dict(), tmp_path, max_shard_bytes=200_000)
    assert len(list(tmp_path.glob("diffusion_pytorch_model-*.safetensors"))) > 1
    model = load_dit(tmp_path, dtype=torch.float32)
    assert model.checkpoint_info.layout == "diffusers" and model.dit_config.family == "bindweave"
    assert_same_model(model, reference, inputs)


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_original_single_file(reference, inputs, tmp_path, prefix):
    write_original(reference, tmp_path / "bindweave.safetensors", prefix=prefix)
    model = load_dit(tmp_path / "bindweave.safetensors", dtype=torch.float32)
    assert model.checkpoint_info.layout == "wan-original"
    assert_same_model(model, reference, inputs)


def test_fp8_scaled_single_file_dequantised(reference, inputs, tmp_path):
    tensors = write_original(reference, tmp_path / "bindweave_fp8_scaled.safetensors", fp8=True)
    model = load_dit(tmp_path / "bindweave_fp8_scaled.safetensors", dtype=torch.float32)
    assert model.checkpoint_info.fp8_scaled
    assert not any(isinstance(m, FP8Linear) for m in model.modules())
    dequantized = dequantized_copy(reference, tensors)
    assert_same_model(model, dequantized, inputs)
    # and it really is a different model from the full-precision one (the test is not vacuous)
    assert (run(dequantized, inputs) - run(reference, inputs)).abs().max() > 1e-4


def test_fp8_scaled_single_file_kept_as_fp8_storage(reference, inputs, tmp_path):
    tensors = write_original(reference, tmp_path / "bindweave_fp8_scaled.safetensors", fp8=True)
    model = load_dit(tmp_path / "bindweave_fp8_scaled.safetensors", dtype=torch.float32, weight_format="fp8")
    fp8 = [m for m in model.modules() if isinstance(m, FP8Linear)]
    assert len(fp8) == TINY.num_layers * 12  # q k v o (self) + q k v o k_img v_img (cross) + 2 ffn
    assert all(m.weight.dtype == torch.float8_e4m3fn for m in fp8)
    torch.testing.assert_close(run(model, inputs), run(dequantized_copy(reference, tensors), inputs),
                               rtol=0, atol=1e-5)


def test_full_precision_file_quantised_to_fp8_on_load(reference, inputs, tmp_path):
    save_sharded(reference.state_dict(), tmp_path)
    model = load_dit(tmp_path, dtype=torch.float32, weight_format="fp8")
    assert any(isinstance(m, FP8Linear) for m in model.modules())
    out, ref = run(model, inputs), run(reference, inputs)
    # e4m3 has a 3-bit mantissa: expect a few percent of relative error, not more
    assert (out - ref).norm() / ref.norm() < 0.05


def test_dtype_cast_on_load_keeps_time_and_norm_tensors_fp32(reference, tmp_path):
    save_sharded(reference.state_dict(), tmp_path)
    model = load_dit(tmp_path, dtype=torch.bfloat16)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert dtypes["blocks.0.attn1.to_q.weight"] == torch.bfloat16
    assert dtypes["condition_embedder.text_projector.linear_1.weight"] == torch.bfloat16
    assert dtypes["blocks.0.scale_shift_table"] == torch.float32
    assert dtypes["condition_embedder.time_embedder.linear_1.weight"] == torch.float32
    for name, p in model.named_parameters():
        assert torch.equal(p.float(), reference.state_dict()[name].to(p.dtype).float()), name


# ------------------------------------------------------------------------------------ errors
def test_truncated_file_is_reported(reference, tmp_path):
    path = tmp_path / "bindweave.safetensors"
    write_original(reference, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_dit(path)


def test_garbage_and_pickle_files_are_reported(tmp_path):
    junk = tmp_path / "model.safetensors"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_dit(junk)
    pickled = tmp_path / "model.ckpt"
    pickled.write_bytes(b"PK")
    with pytest.raises(CheckpointError, match="pickled PyTorch checkpoint, not safetensors"):
        load_dit(pickled)
    with pytest.raises(CheckpointError, match="no such file"):
        load_dit(tmp_path / "absent.safetensors")


def test_wrong_model_says_what_it_looks_like(tmp_path):
    vae = {"encoder.conv1.weight": torch.zeros(4, 3, 3, 3, 3), "decoder.conv1.weight": torch.zeros(4, 4, 3, 3, 3),
           "encoder.downsamples.0.residual.0.gamma": torch.zeros(4, 1, 1, 1)}
    save_file(vae, str(tmp_path / "wan_2.1_vae.safetensors"))
    with pytest.raises(CheckpointError, match="not a BindWeave/Wan DiT; it looks like a Wan 2.1 VAE"):
        load_dit(tmp_path / "wan_2.1_vae.safetensors")


def test_missing_keys_are_errors_and_unexpected_ones_warnings(reference, tmp_path, caplog):
    sd = dict(reference.state_dict())
    del sd["blocks.1.attn2.add_k_proj.weight"]
    sd["blocks.0.extra_adapter.weight"] = torch.zeros(2)
    save_file(sd, str(tmp_path / "dit.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_dit(tmp_path / "dit.safetensors")
    assert "blocks.1.attn2.add_k_proj.weight" in str(err.value)
    assert "unexpected 1 keys: blocks.0.extra_adapter.weight" in caplog.text  # warned, not an error
    ckpt = scan_dit(tmp_path / "dit.safetensors")
    assert ckpt.missing == ["blocks.1.attn2.add_k_proj.weight"]
    assert ckpt.unexpected == ["blocks.0.extra_adapter.weight"]


# ------------------------------------------------------------------------------------ config.json and metadata
def _diffusers_dir(reference, folder, **changes):
    """A diffusers transformer folder: shards plus a config.json written with diffusers' names by hand."""
    save_sharded(reference.state_dict(), folder, max_shard_bytes=200_000)
    config = {"_class_name": "WanTransformer3DModel", "_diffusers_version": "0.42.1", "added_kv_proj_dim": 64,
              "attention_head_dim": 32, "cross_attn_norm": True, "eps": 1e-06, "ffn_dim": 128, "freq_dim": 32,
              "image_dim": 32, "in_channels": 36, "num_attention_heads": 2, "num_layers": 2, "out_channels": 16,
              "patch_size": [1, 2, 2], "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 1024, "text_dim": 32}
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


def test_diffusers_config_eps_is_the_models_eps(reference, tmp_path):
    model = load_dit(_diffusers_dir(reference, tmp_path, eps=1e-3), dtype=torch.float32)
    assert model.dit_config.eps == 1e-3
    block = model.blocks[0]
    assert (block.norm1.eps, block.norm2.eps, block.attn1.norm_q.eps, model.norm_out.eps) == (1e-3,) * 4
    x = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(0))
    # the norm computes with it: (x - mean) / sqrt(var + 1e-3), written out here
    expected = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-3)
    torch.testing.assert_close(block.norm1(x), expected)


@pytest.mark.parametrize("changes, message", [
    ({"qk_norm": "rms_norm"}, "implements only qk_norm='rms_norm_across_heads'"),
    ({"rope_max_seq_len": 2048}, "implements only rope_max_seq_len=1024"),
    ({"num_layers": 3}, "says num_layers=3 but the weights have num_layers=2"),
    ({"added_kv_proj_dim": None}, "says added_kv_proj_dim=None but the weights' image key/value projections are 64"),
    ({"attention_head_dim": 16, "num_attention_heads": 4}, None),  # another head split of the same width: used
    ({"attention_head_dim": 24, "num_attention_heads": 2}, "do not make the width 64"),
    ({"sample_size": 64}, "unknown DiT config key(s) ['sample_size']"),
])
def test_diffusers_config_fields_are_used_or_refused(reference, tmp_path, changes, message):
    folder = _diffusers_dir(reference, tmp_path, **changes)
    if message is None:
        assert (scan_dit(folder).config.num_heads, scan_dit(folder).config.head_dim) == (4, 16)
        return
    with pytest.raises(CheckpointError, match=re.escape(message)):
        scan_dit(folder)


def test_width_without_config_is_refused_unless_one_known_model_has_it(tmp_path):
    odd = TINY.replace(num_heads=3)  # 96 wide: no preset has that width
    save_file(build_dit(odd).state_dict(), str(tmp_path / "odd.safetensors"))
    with pytest.raises(CheckpointError, match="cannot tell the head size of a DiT 96 wide.*config.json.*config=DiTConfig"):
        load_dit(tmp_path / "odd.safetensors")
    assert load_dit(tmp_path / "odd.safetensors", config=odd).dit_config.num_heads == 3
    # a file without metadata whose width one known model has keeps loading by its width (the KJ fp8 files)
    save_file(build_dit(TINY).state_dict(), str(tmp_path / "known.safetensors"))
    assert scan_dit(tmp_path / "known.safetensors").config == TINY


def test_dit_from_a_config_and_a_state_dict(reference, inputs):
    model = dit_from_state_dict(TINY, reference.state_dict(), dtype=torch.float32)
    assert_same_model(model, reference, inputs)
    half = dit_from_state_dict(TINY, reference.state_dict(), dtype=torch.bfloat16)
    assert half.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert half.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32  # kept as load_dit keeps it
    sd = dict(reference.state_dict())
    del sd["proj_out.bias"]
    sd["blocks.0.ffn.net.0.proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match=r"1 missing: proj_out.bias; 1 wrongly shaped: "
                                              r"blocks.0.ffn.net.0.proj.weight \(3, 3\) \(expected \(128, 64\)\)"):
        dit_from_state_dict(TINY, sd)


def test_planner_states_already_text_width_are_refused_with_the_fix(reference, inputs):
    from bindweave_core.errors import InputError

    projected = torch.zeros(1, 7, TINY.text_dim)  # already through a connector
    with pytest.raises(InputError, match="already through a connector.*raw Qwen2.5-VL states \\(64 wide"):
        run(reference, {**inputs, "planner_states": projected})
    with pytest.raises(InputError, match="are 48 wide; this DiT's connector takes 64-wide"):
        run(reference, {**inputs, "planner_states": torch.zeros(1, 7, 48)})


# ------------------------------------------------------------------------------------ inspect
def test_inspect_reports_each_layout(reference, tmp_path):
    save_sharded(reference.state_dict(), tmp_path / "diffusers", max_shard_bytes=200_000)
    write_original(reference, tmp_path / "original.safetensors")
    write_original(reference, tmp_path / "fp8.safetensors", fp8=True)
    n = count_parameters(reference)
    rep = inspect_checkpoint(tmp_path / "diffusers")
    assert (rep["kind"], rep["layout"], rep["family"], rep["parameters"]) == ("dit", "diffusers", "bindweave", n)
    assert rep["dtypes"] == {"float32": len(reference.state_dict())} and rep["problems"] == []
    rep = inspect_checkpoint(tmp_path / "original.safetensors")
    assert (rep["layout"], rep["family"], rep["parameters"], rep["fp8_scaled"]) == ("wan-original", "bindweave", n, False)
    rep = inspect_checkpoint(tmp_path / "fp8.safetensors")
    # 12 block linears per layer plus the "scaled_fp8" marker tensor
    assert rep["fp8_scaled"] and rep["dtypes"]["float8_e4m3fn"] == TINY.num_layers * 12 + 1
    assert rep["parameters"] == n and rep["problems"] == []
    assert rep["config"]["planner_dim"] == TINY.planner_dim and rep["config"]["num_layers"] == TINY.num_layers


def test_inspect_command_line(reference, tmp_path):
    write_original(reference, tmp_path / "original.safetensors")
    out = subprocess.run([sys.executable, "-m", "bindweave_core", "inspect", str(tmp_path / "original.safetensors"),
                          "--json"], capture_output=True, text=True, cwd=REPO, check=True)
    report = json.loads(out.stdout)
    assert report["layout"] == "wan-original" and report["family"] == "bindweave"
    text = subprocess.run([sys.executable, "-m", "bindweave_core", "inspect", str(tmp_path / "original.safetensors")],
                          capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert "layout:      wan-original" in text and f"{count_parameters(reference):,}" in text

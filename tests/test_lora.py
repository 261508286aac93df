"""LoRA files: every supported key layout maps onto our DiT, our files round-trip, apply/remove, errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from bindweave_core.errors import CheckpointError
from bindweave_core.fp8 import FP8Linear
from bindweave_core.lora import (
    FORMAT_KEY,
    LoraLayer,
    LoraWeights,
    apply_lora,
    load_lora,
    lora_state_dict,
    original_name,
    save_lora,
)
from bindweave_core.smoke import smoke_dit

DIM, FFN = 64, 128  # the tiny preset: 2 heads x 32, ffn 128
RANK = 4


def pair(out_f: int, in_f: int, seed: int, rank: int = RANK) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rank, in_f, generator=g) * 0.1, torch.randn(out_f, rank, generator=g) * 0.1


def write(tmp_path, name: str, tensors: dict[str, torch.Tensor], metadata=None):
    path = tmp_path / name
    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(3)
    return dict(hidden_states=torch.randn(1, 16, 2, 4, 4, generator=g), timestep=torch.tensor([300.0]),
                encoder_hidden_states=torch.randn(1, 512, 32, generator=g),
                encoder_hidden_states_image=torch.randn(1, 1028, 32, generator=g),
                planner_states=torch.randn(1, 7, 64, generator=g), condition=torch.randn(1, 20, 6, 4, 4, generator=g))


def run(dit, inputs):
    with torch.no_grad():
        return dit(**inputs)


# ------------------------------------------------------------------------------------------ layouts
# (stored key prefix of the pair, suffixes for down/up, alpha key or None) -> our module name
LAYOUTS = {
    "diffusers": ([("transformer.blocks.0.attn1.to_q", "blocks.0.attn1.to_q", DIM, DIM),
                   ("transformer.blocks.1.attn2.add_k_proj", "blocks.1.attn2.add_k_proj", DIM, DIM),
                   ("transformer.blocks.0.ffn.net.0.proj", "blocks.0.ffn.net.0.proj", FFN, DIM)],
                  ".lora_A.weight", ".lora_B.weight", None),
    "peft": ([("base_model.model.blocks.0.attn2.to_out.0", "blocks.0.attn2.to_out.0", DIM, DIM),
              ("base_model.model.blocks.1.ffn.net.2", "blocks.1.ffn.net.2", DIM, FFN)],
             ".lora_A.default.weight", ".lora_B.default.weight", None),
    "wan-original": ([("diffusion_model.blocks.0.self_attn.q", "blocks.0.attn1.to_q", DIM, DIM),
                      ("diffusion_model.blocks.1.cross_attn.k_img", "blocks.1.attn2.add_k_proj", DIM, DIM),
                      ("diffusion_model.blocks.0.cross_attn.o", "blocks.0.attn2.to_out.0", DIM, DIM),
                      ("diffusion_model.blocks.1.ffn.0", "blocks.1.ffn.net.0.proj", FFN, DIM)],
                     ".lora_A.weight", ".lora_B.weight", ".alpha"),
    "wan-original-down-up": ([("diffusion_model.blocks.0.self_attn.v", "blocks.0.attn1.to_v", DIM, DIM),
                              ("diffusion_model.blocks.1.ffn.2", "blocks.1.ffn.net.2", DIM, FFN)],
                             ".lora_down.weight", ".lora_up.weight", ".alpha"),
    "kohya": ([("lora_unet_blocks_0_self_attn_q", "blocks.0.attn1.to_q", DIM, DIM),
               ("lora_unet_blocks_1_cross_attn_v_img", "blocks.1.attn2.add_v_proj", DIM, DIM),
               ("lora_unet_blocks_0_ffn_0", "blocks.0.ffn.net.0.proj", FFN, DIM),
               ("lora_unet_blocks_1_self_attn_o", "blocks.1.attn1.to_out.0", DIM, DIM)],
              ".lora_down.weight", ".lora_up.weight", ".alpha"),
    "wan-fun": ([("lora_unet__blocks_0_cross_attn_k", "blocks.0.attn2.to_k", DIM, DIM)],
                ".lora_down.weight", ".lora_up.weight", ".alpha"),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_each_layout_maps_onto_our_modules_and_applies(tmp_path, layout, inputs):
    entries, down_suffix, up_suffix, alpha_suffix = LAYOUTS[layout]
    tensors, expected = {}, {}
    for i, (stored, ours, out_f, in_f) in enumerate(entries):
        down, up = pair(out_f, in_f, seed=i)
        tensors[stored + down_suffix], tensors[stored + up_suffix] = down, up
        alpha = None
        if alpha_suffix:
            alpha = 2.0 * (i + 1)
            tensors[stored + alpha_suffix] = torch.tensor(alpha)
        expected[ours] = (down, up, alpha)
    lora = load_lora(write(tmp_path, f"{layout}.safetensors", tensors))
    assert set(lora.layers) == set(expected)
    for ours, (down, up, alpha) in expected.items():
        layer = lora.layers[ours]
        assert torch.equal(layer.down, down) and torch.equal(layer.up, up) and layer.alpha == alpha
        assert layer.scale == (alpha / RANK if alpha else 1.0)

    # applying = adding scale * up @ down to exactly those weights
    dit = smoke_dit(0)
    before = {n: p.clone() for n, p in dit.named_parameters()}
    applied = apply_lora(dit, lora, strength=0.5)
    for name, p in dit.named_parameters():
        module = name.rpartition(".")[0]
        if name.endswith(".weight") and module in expected:
            down, up, alpha = expected[module]
            want = before[name] + 0.5 * (alpha / RANK if alpha else 1.0) * (up @ down)
            torch.testing.assert_close(p, want, rtol=0, atol=1e-6)
        else:
            assert torch.equal(p, before[name]), name
    applied.remove()
    for name, p in dit.named_parameters():
        torch.testing.assert_close(p, before[name], rtol=0, atol=1e-6)


def test_diff_keys_reach_norms_biases_modulation_and_the_connector(tmp_path):
    dit = smoke_dit(0)
    shapes = {n: p.shape for n, p in dit.named_parameters()}
    stored = {  # original Wan names (norm3 is diffusers' norm2; the connector is text_projection)
        "diffusion_model.blocks.0.norm3.diff": "blocks.0.norm2.weight",
        "diffusion_model.blocks.0.self_attn.o.diff_b": "blocks.0.attn1.to_out.0.bias",
        "diffusion_model.head.head.diff_b": "proj_out.bias",
        "diffusion_model.blocks.1.modulation.diff": "blocks.1.scale_shift_table",
        "diffusion_model.text_projection.0.diff": "condition_embedder.text_projector.linear_1.weight",
        "diffusion_model.text_projection.2.diff_b": "condition_embedder.text_projector.linear_2.bias",
    }
    tensors = {k: torch.randn(shapes[v]) for k, v in stored.items()}
    lora = load_lora(write(tmp_path, "diffs.safetensors", tensors))
    assert set(lora.diffs) == set(stored.values()) and not lora.layers
    before = {n: p.clone() for n, p in dit.named_parameters()}
    applied = apply_lora(dit, lora, strength=2.0)
    params = dict(dit.named_parameters())
    for key, ours in stored.items():
        torch.testing.assert_close(params[ours], before[ours] + 2.0 * tensors[key])
    applied.remove()
    assert all(torch.equal(p, before[n]) for n, p in dit.named_parameters())


def test_our_files_round_trip_with_comfyui_native_wan_names(tmp_path):
    layers = {"blocks.0.attn1.to_q": LoraLayer(*pair(DIM, DIM, 1), alpha=8.0),
              "blocks.1.attn2.add_v_proj": LoraLayer(*pair(DIM, DIM, 2), alpha=4.0),
              "blocks.1.ffn.net.2": LoraLayer(*pair(DIM, FFN, 3), alpha=None)}
    diffs = {"condition_embedder.text_projector.linear_1.weight": torch.randn(32, 64),
             "condition_embedder.text_projector.linear_1.bias": torch.randn(32)}
    lora = LoraWeights(layers=layers, diffs=diffs)
    path = save_lora(lora, tmp_path / "ours.safetensors", metadata={"note": "x"})
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    # What ComfyUI's lora loader looks up for its native Wan model: diffusion_model.<original name> +
    # .lora_A.weight / .lora_B.weight / .alpha (comfy/lora.py model_lora_keys_unet, weight_adapter/lora.py).
    assert keys == {
        "diffusion_model.blocks.0.self_attn.q.lora_A.weight", "diffusion_model.blocks.0.self_attn.q.lora_B.weight",
        "diffusion_model.blocks.0.self_attn.q.alpha",
        "diffusion_model.blocks.1.cross_attn.v_img.lora_A.weight",
        "diffusion_model.blocks.1.cross_attn.v_img.lora_B.weight", "diffusion_model.blocks.1.cross_attn.v_img.alpha",
        "diffusion_model.blocks.1.ffn.2.lora_A.weight", "diffusion_model.blocks.1.ffn.2.lora_B.weight",
        "diffusion_model.blocks.1.ffn.2.alpha",
        "diffusion_model.text_projection.0.diff", "diffusion_model.text_projection.0.diff_b"}
    assert meta[FORMAT_KEY] == "1" and meta["note"] == "x"
    back = load_lora(path)
    assert back.source_format == "bindweave" and set(back.layers) == set(layers) and set(back.diffs) == set(diffs)
    for name, layer in layers.items():
        got = back.layers[name]
        assert torch.equal(got.down, layer.down) and torch.equal(got.up, layer.up)
        assert got.scale == layer.scale  # alpha None is written as alpha = rank
    assert all(torch.equal(back.diffs[k], v) for k, v in diffs.items())
    assert original_name("blocks.3.norm2") == "blocks.3.norm3" and original_name("proj_out") == "head.head"
    # the node-side view: patches keyed by our parameter names
    assert set(back.weight_patches()) == {f"{n}.weight" for n in layers}


# ------------------------------------------------------------------------------------------ applying
def test_merge_and_hooks_agree_and_remove_restores(inputs):
    lora = LoraWeights(layers={n: LoraLayer(*pair(o, i, k), alpha=2.0) for k, (n, o, i) in enumerate([
        ("blocks.0.attn1.to_q", DIM, DIM), ("blocks.0.attn2.add_k_proj", DIM, DIM), ("blocks.1.ffn.net.0.proj", FFN, DIM),
        ("blocks.1.attn1.to_out.0", DIM, DIM)])})
    dit = smoke_dit(0)
    base = run(dit, inputs)
    hooked = apply_lora(dit, lora, 0.8, mode="hooks")
    out_hooks = run(dit, inputs)
    hooked.remove()
    assert torch.equal(run(dit, inputs), base)  # hooks leave the weights alone
    merged = apply_lora(dit, lora, 0.8, keep_original=True)
    out_merge = run(dit, inputs)
    merged.remove()
    assert torch.equal(run(dit, inputs), base)  # exact with the backup
    assert (out_merge - base).abs().max() > 1e-3
    torch.testing.assert_close(out_hooks, out_merge, rtol=0, atol=2e-5)


def test_fp8_weights_merge_by_requantising_and_hooks_leave_them_alone(inputs):
    from training.model import to_fp8

    lora = LoraWeights(layers={"blocks.0.attn1.to_q": LoraLayer(*pair(DIM, DIM, 5), alpha=4.0)})
    dit = to_fp8(smoke_dit(0))
    q = dit.blocks[0].attn1.to_q
    assert isinstance(q, FP8Linear)
    stored, scale = q.weight.clone(), q.scale_weight.clone()
    reference = q.dequantized_weight(torch.float32) + lora.layers["blocks.0.attn1.to_q"].delta()
    hooked = apply_lora(dit, lora, mode="hooks")
    assert torch.equal(q.weight, stored)
    hooked.remove()
    merged = apply_lora(dit, lora, keep_original=True)
    assert q.weight.dtype == torch.float8_e4m3fn
    err = (q.dequantized_weight(torch.float32) - reference).abs().max()
    assert err <= reference.abs().max() / 16  # e4m3: 3 mantissa bits
    merged.remove()
    assert torch.equal(q.weight, stored) and torch.equal(q.scale_weight, scale)


# ------------------------------------------------------------------------------------------ errors
def test_clear_errors(tmp_path):
    dit = smoke_dit(0)
    # a whole model is not a LoRA
    not_lora = write(tmp_path, "dit.safetensors", {k: v.contiguous() for k, v in list(dit.state_dict().items())[:20]})
    with pytest.raises(CheckpointError, match="not a LoRA"):
        load_lora(not_lora)
    # a LoRA for another model: its keys are named
    flux = write(tmp_path, "flux.safetensors", {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 8),
                                                "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(8, 4)})
    with pytest.raises(CheckpointError, match="lora_unet_double_blocks_0_img_attn_qkv"):
        load_lora(flux)
    # half a pair
    half = write(tmp_path, "half.safetensors", {"diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.zeros(4, DIM)})
    with pytest.raises(CheckpointError, match="only one half"):
        load_lora(half)
    # the right names, the wrong model size (e.g. a 14B LoRA on the tiny model): named with shapes
    wide = LoraWeights(layers={"blocks.0.attn1.to_q": LoraLayer(torch.zeros(4, 5120), torch.zeros(5120, 4))})
    with pytest.raises(CheckpointError, match=r"blocks\.0\.attn1\.to_q .*5120"):
        apply_lora(dit, wide)
    # a module this model does not have
    deep = LoraWeights(layers={"blocks.7.attn1.to_q": LoraLayer(torch.zeros(4, DIM), torch.zeros(DIM, 4))})
    with pytest.raises(CheckpointError, match=r"match nothing in this model: blocks\.7\.attn1\.to_q"):
        apply_lora(dit, deep)
    garbage = tmp_path / "broken.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="broken.safetensors"):
        load_lora(garbage)


def test_state_dict_casts_to_the_save_dtype():
    lora = LoraWeights(layers={"blocks.0.attn1.to_q": LoraLayer(*pair(DIM, DIM, 0), alpha=4.0)})
    sd = lora_state_dict(lora, torch.bfloat16)
    assert sd["diffusion_model.blocks.0.self_attn.q.lora_A.weight"].dtype == torch.bfloat16
    assert sd["diffusion_model.blocks.0.self_attn.q.alpha"].dtype == torch.float32

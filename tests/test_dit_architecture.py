"""The BindWeave DiT against diffusers' Wan transformer and against the spec's tensor math."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanAttnProcessor, WanRotaryPosEmbed

from bindweave_core.config import PRESETS, DiTConfig
from bindweave_core.dit import build_dit, connector_parameters, count_parameters
from bindweave_core.dit.positions import grid_positions, rrope_layout_positions, slot_layout_positions
from bindweave_core.dit.rope import RotaryEmbedding3D
from helpers import randomize_

TINY = PRESETS["tiny"]


def tiny_model(cfg: DiTConfig = TINY, seed: int = 0):
    return randomize_(build_dit(cfg), seed=seed)


def ref_attention(q, k, v):
    """Plain softmax attention over [B, S, H, D]."""
    w = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("bhqk,bkhd->bqhd", w.softmax(-1), v)


def rms(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


# ------------------------------------------------------------------------------------------ base path
def test_base_path_matches_diffusers_wan():
    """No connector, no slots, 257 image tokens, 512 text tokens: identical to diffusers' Wan I2V."""
    cfg = TINY.replace(family="wan-i2v", planner_dim=None)
    ours = tiny_model(cfg, seed=1)
    theirs = WanTransformer3DModel(**cfg.diffusers_kwargs()).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)

    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 16, 3, 6, 8, generator=g)
    cond = torch.randn(1, 20, 3, 6, 8, generator=g)
    t5 = torch.randn(1, 512, cfg.text_dim, generator=g)
    clip = torch.randn(1, 257, cfg.image_dim, generator=g)
    t = torch.tensor([637.0])
    with torch.no_grad():
        ref = theirs(torch.cat([x, cond], 1), t, t5, clip, return_dict=False)[0]
        official = ours(x, t, t5, clip, condition=cond)  # default: float64 timestep sinusoid
        ours.set_timestep_precision(float64=False)  # diffusers computes it in float32
        out = ours(x, t, t5, clip, condition=cond)
    assert out.shape == (1, 16, 3, 6, 8)
    assert (out - ref).abs().max().item() <= 1e-5
    # the official float64 sinusoid moves the output by ~1e-5 only (spec 9b)
    assert 0 < (official - ref).abs().max().item() < 1e-4


# ------------------------------------------------------------------------------------------ context
def test_context_assembly_matches_spec_math():
    """ctx = [img_emb(clip) ; text_emb([connector(qwen) ; t5])] with the spec's layers (sections 4, 6, 9b)."""
    m = tiny_model()
    sd = m.state_dict()
    g = torch.Generator().manual_seed(3)
    t5 = torch.randn(1, 512, TINY.text_dim, generator=g)
    qwen = torch.randn(1, 7, TINY.planner_dim, generator=g)
    clip = torch.randn(1, 1028, TINY.image_dim, generator=g)
    t = torch.tensor([431.0])
    with torch.no_grad():
        temb, tproj, ctx, lengths = m.embed_context(t5, qwen, None, clip, timestep=t)

    def lin(x, name):
        return F.linear(x, sd[name + ".weight"], sd[name + ".bias"])

    e = "condition_embedder."
    connector = lin(F.gelu(lin(qwen, e + "text_projector.linear_1"), approximate="tanh"), e + "text_projector.linear_2")
    text_in = torch.cat([connector, t5], 1)
    text = lin(F.gelu(lin(text_in, e + "text_embedder.linear_1"), approximate="tanh"), e + "text_embedder.linear_2")
    ie = e + "image_embedder."
    h = F.layer_norm(clip, (TINY.image_dim,), sd[ie + "norm1.weight"], sd[ie + "norm1.bias"], eps=1e-5)
    h = lin(F.gelu(lin(h, ie + "ff.net.0.proj")), ie + "ff.net.2")  # exact (erf) GELU
    img = F.layer_norm(h, (TINY.dim,), sd[ie + "norm2.weight"], sd[ie + "norm2.bias"], eps=1e-5)
    expected = torch.cat([img, text], 1)
    assert ctx.shape == (1, 1028 + 7 + 512, TINY.dim)
    assert lengths is None
    torch.testing.assert_close(ctx, expected, rtol=0, atol=1e-5)

    # time: float64 sinusoid [cos, sin](t * 10000^(-i/half)) -> Linear -> SiLU -> Linear; proj = Linear(SiLU)
    half = TINY.freq_dim // 2
    ang = t.double()[:, None] * torch.pow(10000.0, -torch.arange(half, dtype=torch.float64) / half)
    sinus = torch.cat([ang.cos(), ang.sin()], -1).float()
    temb_ref = lin(F.silu(lin(sinus, e + "time_embedder.linear_1")), e + "time_embedder.linear_2")
    torch.testing.assert_close(temb, temb_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(tproj.flatten(1), lin(F.silu(temb_ref), e + "time_proj"), rtol=0, atol=1e-6)


def test_connector_shapes_of_the_14b_preset():
    with torch.device("meta"):
        m = build_dit(PRESETS["bindweave-14b"], device="meta")
    proj = m.condition_embedder.text_projector
    assert (proj.linear_1.in_features, proj.linear_1.out_features) == (3584, 4096)
    assert (proj.linear_2.in_features, proj.linear_2.out_features) == (4096, 4096)
    assert proj.act_1.approximate == "tanh"


# ------------------------------------------------------------------------------------------ 257 split
def test_image_stream_sees_first_257_tokens_only():
    m = tiny_model(seed=4)
    attn = m.blocks[0].attn2
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(1, 30, TINY.dim, generator=g)
    ctx = torch.randn(1, 1028 + 7 + 512, TINY.dim, generator=g)
    with torch.no_grad():
        ours = attn(hidden, ctx)

        eps = TINY.eps
        heads = TINY.num_heads
        q = rms(attn.to_q(hidden), attn.norm_q.weight, eps).unflatten(2, (heads, -1))
        txt, img = ctx[:, 257:], ctx[:, :257]
        k = rms(attn.to_k(txt), attn.norm_k.weight, eps).unflatten(2, (heads, -1))
        v = attn.to_v(txt).unflatten(2, (heads, -1))
        ki = rms(attn.add_k_proj(img), attn.norm_added_k.weight, eps).unflatten(2, (heads, -1))
        vi = attn.add_v_proj(img).unflatten(2, (heads, -1))
        expected = attn.to_out[0]((ref_attention(q, k, v) + ref_attention(q, ki, vi)).flatten(2))
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)

        # diffusers' own processor takes "all but the last 512 tokens" as the image stream: different.
        attn.set_processor(WanAttnProcessor())
        diffusers_split = attn(hidden, ctx)
    assert (diffusers_split - ours).abs().max().item() > 1e-2


# ------------------------------------------------------------------------------------------ slots
def test_slots_pad_zeros_in_front_and_drop_first_frames():
    m = tiny_model(seed=6)
    g = torch.Generator().manual_seed(7)
    T, h, w = 3, 4, 6
    x = torch.randn(1, 16, T, h, w, generator=g)
    cond = torch.randn(1, 20, 4 + T, h, w, generator=g)
    t5 = torch.randn(1, 512, TINY.text_dim, generator=g)
    clip = torch.randn(1, 1028, TINY.image_dim, generator=g)
    qwen = torch.randn(1, 5, TINY.planner_dim, generator=g)
    t = torch.tensor([250.0])
    with torch.no_grad():
        out = m(x, t, t5, clip, planner_states=qwen, condition=cond)
        # the same computation spelled out: 4 zero frames in front of the noise, nothing dropped
        x_padded = torch.cat([torch.zeros(1, 16, 4, h, w), x], dim=2)
        full = m(x_padded, t, t5, clip, planner_states=qwen, condition=cond)
    assert out.shape == (1, 16, T, h, w)
    assert full.shape == (1, 16, 4 + T, h, w)
    torch.testing.assert_close(out, full[:, :, 4:], rtol=0, atol=0)


def test_batched_items_with_different_planner_lengths_match_single_calls():
    """cond + uncond in one batch (planner states 5 vs 8 tokens) == two batch-1 calls."""
    m = tiny_model(seed=8)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(1, 16, 2, 4, 4, generator=g)
    cond = torch.randn(1, 20, 6, 4, 4, generator=g)
    clip = torch.randn(1, 1028, TINY.image_dim, generator=g)
    t5 = torch.randn(2, 512, TINY.text_dim, generator=g)
    q_pos = torch.randn(1, 5, TINY.planner_dim, generator=g)
    q_neg = torch.randn(1, 8, TINY.planner_dim, generator=g)
    t = torch.tensor([900.0])
    with torch.no_grad():
        a = m(x, t, t5[:1], clip, planner_states=q_pos, condition=cond)
        b = m(x, t, t5[1:], clip, planner_states=q_neg, condition=cond)
        padded = torch.zeros(2, 8, TINY.planner_dim)
        padded[0, :5], padded[1] = q_pos[0], q_neg[0]
        both = m(x.expand(2, -1, -1, -1, -1), t.expand(2), t5, clip.expand(2, -1, -1),
                 planner_states=padded, planner_lengths=[5, 8], condition=cond.expand(2, -1, -1, -1, -1))
    torch.testing.assert_close(both[:1], a, rtol=0, atol=1e-5)
    torch.testing.assert_close(both[1:], b, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------ positions
def test_slot_layout_grid_matches_raster_formula():
    F_, H, W = 7, 3, 4
    pos = slot_layout_positions(F_, H, W)
    expected = torch.tensor([[i // (H * W), (i // W) % H, i % W] for i in range(F_ * H * W)])
    assert torch.equal(pos, expected)
    # the reference slots are temporal indices 0..3, the video frames 4..T+3
    assert pos[: 4 * H * W, 0].max() == 3 and pos[4 * H * W:, 0].min() == 4


def test_rrope_layout_grid_matches_formula():
    n, H, W, T = 3, 2, 3, 2
    pos = rrope_layout_positions(n, H, W, T, shift=80)
    rows = [[i, 80 + y, 80 + x] for i in range(n) for y in range(H) for x in range(W)]
    rows += [[t, y, x] for t in range(T) for y in range(H) for x in range(W)]
    assert torch.equal(pos, torch.tensor(rows))


def test_rotary_tables_match_wan_frequencies_and_diffusers():
    head_dim = 128
    rope = RotaryEmbedding3D(head_dim)
    pos = grid_positions(5, 3, 4)
    cos, sin = rope(pos)
    # Wan: t gets 44 channels, h and w 42 each; pair i of an axis of d channels rotates at 10000^(-2i/d)
    dims = (44, 42, 42)
    angles = []
    for axis, d in enumerate(dims):
        inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        angles.append(pos[:, axis, None].double() * inv)
    ang = torch.cat(angles, -1)
    torch.testing.assert_close(cos[0, :, 0], ang.cos().float(), rtol=0, atol=1e-7)
    torch.testing.assert_close(sin[0, :, 0], ang.sin().float(), rtol=0, atol=1e-7)
    d_cos, d_sin = WanRotaryPosEmbed(head_dim, (1, 2, 2), 1024)(torch.zeros(1, 16, 5, 6, 8))
    torch.testing.assert_close(cos[0, :, 0], d_cos[0, :, 0, 0::2].float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(sin[0, :, 0], d_sin[0, :, 0, 1::2].float(), rtol=0, atol=1e-6)


def test_explicit_positions_override_the_layout():
    """Explicit positions are used: moving the slot tokens away in h/w (as R-RoPE would) changes the output."""
    m = tiny_model(seed=10)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(1, 16, 1, 4, 4, generator=g)
    cond = torch.randn(1, 20, 5, 4, 4, generator=g)
    args = (x, torch.tensor([10.0]), torch.randn(1, 512, TINY.text_dim, generator=g),
            torch.randn(1, 1028, TINY.image_dim, generator=g))
    grid = slot_layout_positions(5, 2, 2)
    with torch.no_grad():
        default = m(*args, condition=cond)
        same = m(*args, condition=cond, positions=grid)
        moved = grid.clone()
        moved[: 4 * 2 * 2, 1:] += 80  # the 4 slot frames' tokens only (a uniform shift is invisible to RoPE)
        shifted = m(*args, condition=cond, positions=moved)
    torch.testing.assert_close(default, same, rtol=0, atol=0)
    assert (default - shifted).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------ 14B preset
def test_bindweave_14b_preset_parameter_count_and_keys():
    """Spec section 1: diffusers' Wan I2V-14B (16,394,878,784) + connector (31,465,472)."""
    with torch.device("meta"):
        ours = build_dit(PRESETS["bindweave-14b"], device="meta")
        wan = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=36,
            out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=1280, added_kv_proj_dim=5120)
    assert count_parameters(wan) == 16_394_878_784
    assert connector_parameters(ours) == 31_465_472
    assert count_parameters(ours) == 16_426_344_256
    connector_keys = {f"condition_embedder.text_projector.linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}
    assert set(ours.state_dict()) == set(wan.state_dict()) | connector_keys


@pytest.mark.parametrize("family", ["wan-t2v"])
def test_text_to_video_family_has_no_image_stream(family):
    cfg = TINY.replace(family=family, in_channels=16, image_dim=None, planner_dim=None)
    m = tiny_model(cfg, seed=12)
    assert m.condition_embedder.image_embedder is None and m.blocks[0].attn2.add_k_proj is None
    with torch.no_grad():
        out = m(torch.randn(1, 16, 2, 4, 4), torch.tensor([5.0]), torch.randn(1, 512, cfg.text_dim))
    assert out.shape == (1, 16, 2, 4, 4)

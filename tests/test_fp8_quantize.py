"""Quantising bf16/fp16 weights to fp8 through the 65536-entry lookup table gives exactly the bytes
of the float32 elementwise formula, for every bit pattern, at any chunking, and is what loading uses."""

from __future__ import annotations

import math

import pytest
import torch

from bindweave_core.checkpoints.dit_loader import load_dit
from bindweave_core.checkpoints.writers import save_sharded
from bindweave_core.config import PRESETS
from bindweave_core.dit import build_dit
from bindweave_core.dit import fp8 as FP8
from helpers import randomize_

HALF = [torch.bfloat16, torch.float16]


def every_pattern(dtype: torch.dtype) -> torch.Tensor:
    """All 65536 values of a 16-bit float type (NaN, inf, +-0 and subnormals included)."""
    return torch.arange(1 << 16, dtype=torch.int32).to(torch.uint16).view(dtype)


def textbook(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """e4m3(w / scale) in float32 with a clamp to +-448, written out independently of the module."""
    return (w.float() / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).view(torch.uint8)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def with_specials(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Gaussian weights plus +-0, the smallest subnormals, a negative absolute maximum and its twin."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    flat = w.view(-1)
    tiny = torch.tensor([1, 2, 0x8001, 0x8003], dtype=torch.int32).to(torch.uint16).view(dtype)
    flat[:8] = torch.cat([torch.tensor([0.0, -0.0], dtype=dtype), tiny, torch.tensor([-0.25, 0.25], dtype=dtype)])
    return w


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("scale", [0.02 / 448, 1e-12, 0.0123456789, 3.0, 1 / 448])
def test_table_is_the_elementwise_formula_for_every_bit_pattern(dtype, scale):
    scale = torch.tensor(scale, dtype=torch.float32)
    values = every_pattern(dtype)
    table = FP8.fp8_lookup_table(dtype, scale)
    assert table.dtype == torch.uint8 and table.shape == (1 << 16,)
    assert same_bytes(table, FP8._quantize_elementwise(values, scale))  # NaN/inf patterns included
    in_range = values.isfinite() & ((values.float() / scale).abs() <= 448.0)
    assert in_range.sum() > (1000 if scale > 1e-9 else 1)  # fp16 has nothing below 6e-8 but +-0
    assert torch.equal(table[in_range], textbook(values[in_range], scale))


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("shape", [(300, 701), (7,), (1, 1), (64, 2, 33)])
def test_quantize_weight_by_lookup_equals_the_elementwise_path(dtype, shape):
    w = with_specials(dtype, shape, seed=sum(shape)) if math.prod(shape) >= 8 else (torch.randn(shape) * 3).to(dtype)
    q, scale = FP8.quantize_weight(w)
    ref_scale = (w.float().abs().max() / 448.0).clamp(min=1e-12)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape and scale.dtype == torch.float32
    assert scale.shape == () and torch.equal(scale, ref_scale)
    assert same_bytes(q, FP8._quantize_elementwise(w, scale))
    assert torch.equal(q.view(torch.uint8), textbook(w, ref_scale))
    assert q.float().abs().max() == 448.0


@pytest.mark.parametrize("dtype", HALF)
def test_every_pattern_in_one_tensor_including_inf_and_nan(dtype):
    # inf in the tensor makes the scale inf and NaN makes it NaN: whatever the float32 formula gives
    # then (zeros, NaN codes), the table gives too
    values = every_pattern(dtype)
    finite = values[values.isfinite()]
    for w in (values, finite, finite[finite.abs() < 1], finite[finite.float().abs() < 1e-30]):
        q, scale = FP8.quantize_weight(w)
        ref_scale = (FP8.tensor_amax(w) / 448.0).clamp(min=1e-12)
        assert torch.equal(scale, ref_scale) or (scale.isnan() and ref_scale.isnan())
        assert same_bytes(q, FP8._quantize_elementwise(w, ref_scale))


@pytest.mark.parametrize("dtype", HALF)
def test_task_and_step_boundaries_and_several_workers(dtype, monkeypatch):
    monkeypatch.setattr(FP8, "_LUT_TASK", 1000)  # 211 tasks, the last one short
    monkeypatch.setattr(FP8, "_LUT_STEP", 384)  # steps that do not divide a task
    torch.set_num_threads(3)
    w = with_specials(dtype, (3, 70_001), seed=5)
    q, scale = FP8.quantize_weight(w)
    assert same_bytes(q, FP8._quantize_elementwise(w, scale))
    torch.set_num_threads(1)
    assert same_bytes(FP8.quantize_weight(w)[0], q)


def test_strided_and_grad_tracking_inputs():
    w = with_specials(torch.bfloat16, (96, 80), seed=6)
    q, scale = FP8.quantize_weight(w.t())  # not contiguous
    assert same_bytes(q, FP8._quantize_elementwise(w.t().contiguous(), scale)) and q.shape == (80, 96)
    p = torch.nn.Parameter(w.clone())
    assert same_bytes(FP8.quantize_weight(p)[0], FP8.quantize_weight(w)[0])


def test_float32_weights_keep_the_elementwise_path(monkeypatch):
    calls = []
    monkeypatch.setattr(FP8, "_quantize_by_lookup", lambda *a: calls.append(a))
    w = torch.randn(40, 30) * 0.1
    q, scale = FP8.quantize_weight(w)
    assert not calls and torch.equal(q.view(torch.uint8), textbook(w, scale))


def test_loading_a_bf16_file_as_fp8_quantises_by_lookup(tmp_path, monkeypatch):
    tiny = PRESETS["tiny"]
    reference = randomize_(build_dit(tiny), seed=31, scale=0.05)
    stored = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in reference.state_dict().items()}
    save_sharded(stored, tmp_path)
    used = []
    real = FP8._quantize_by_lookup
    monkeypatch.setattr(FP8, "_quantize_by_lookup", lambda w, s: used.append(w.dtype) or real(w, s))
    model = load_dit(tmp_path, dtype=torch.bfloat16, weight_format="fp8")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, FP8.FP8Linear)}
    assert len(layers) == tiny.num_layers * 12 and used == [torch.bfloat16] * len(layers)
    for name, layer in layers.items():
        w = stored[name + ".weight"]
        scale = (w.float().abs().max() / 448.0).clamp(min=1e-12)
        assert torch.equal(layer.scale_weight, scale)
        assert same_bytes(layer.weight, FP8._quantize_elementwise(w, scale))

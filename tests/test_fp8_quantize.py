"""Quantising bf16/fp16 weights to fp8 (``quantize_weight``) gives exactly the bytes of the float32
formula for every bit pattern, at any chunking, and is what loading an fp8 DiT stores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bindweave_core import fp8 as FP8
from bindweave_core.checkpoints.writers import save_sharded
from bindweave_core.config import PRESETS
from bindweave_core.dit import build_dit
from bindweave_core.dit.loading import load_dit
from helpers import randomize_

HALF = [torch.bfloat16, torch.float16]


def every_pattern(dtype: torch.dtype) -> torch.Tensor:
    """All 65536 values of a 16-bit float type (NaN, inf, +-0 and subnormals included)."""
    return torch.arange(1 << 16, dtype=torch.int32).to(torch.uint16).view(dtype)


def e4m3fn_bytes(x: torch.Tensor) -> torch.Tensor:
    """The float8 e4m3fn byte of each value, from the format's definition (OCP FP8): a sign bit, 4 exponent
    bits with bias 7 and 3 mantissa bits; code ``e.m`` is ``(1 + m/8) 2^(e-7)``, or ``m/8 2^-6`` for ``e = 0``
    (subnormals); no infinities, ``S.1111.111`` is NaN, so 448 (``1.1111.110``) is the largest finite value.
    Rounds to the nearest code, ties to the even one (mantissa ending in 0); values here are within 448."""
    codes = np.arange(127)  # the non-negative finite codes, in increasing value
    e, m = codes >> 3, codes & 7
    values = np.where(e == 0, m / 8 * 2.0 ** -6, (1 + m / 8) * 2.0 ** (e - 7))
    a = np.abs(x.double().numpy().ravel())
    hi = np.clip(np.searchsorted(values, np.nan_to_num(a, nan=0.0)), 0, 126)  # first code >= a
    lo = np.maximum(hi - 1, 0)
    below, above = a - values[lo], values[hi] - a
    nearest = np.where(below < above, lo, np.where(above < below, hi, np.where(lo % 2 == 0, lo, hi)))
    code = np.where(np.isnan(a), 0x7F, nearest) | (np.signbit(x.numpy().ravel()).astype(np.int64) << 7)
    return torch.from_numpy(code.astype(np.uint8)).view(x.shape)


def textbook(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """e4m3(w / scale): the float32 division, a clamp to +-448, then the format's rounding (above)."""
    return e4m3fn_bytes((w.float() / scale).clamp(-448.0, 448.0))


def test_the_reference_encoder_knows_the_format():
    """Spot values of the e4m3fn table: 448 = 0x7E, 1 = 0x38, the smallest subnormal 2^-9 = 0x01, -0.0 = 0x80,
    a tie between 1 and 1.125 goes to the even code (1), NaN = 0x7F."""
    x = torch.tensor([448.0, 1.0, 2.0 ** -9, -0.0, 1.0625, 1.1875, float("nan"), -2.0 ** -10])
    assert e4m3fn_bytes(x).tolist() == [0x7E, 0x38, 0x01, 0x80, 0x38, 0x3A, 0x7F, 0x80]


def textbook_scale(w: torch.Tensor) -> torch.Tensor:
    return (w.float().abs().max() / 448.0).clamp(min=1e-12)


@pytest.mark.parametrize("dtype", HALF)
def test_every_finite_bit_pattern_quantises_as_the_float32_formula(dtype):
    values = every_pattern(dtype)
    finite = values[values.isfinite()]
    # the whole range at once, only the small magnitudes (another scale), only the subnormals and zeros
    subnormal = finite[(finite != 0) & (finite.float().abs() < torch.finfo(dtype).tiny)]
    for w in (finite, finite[finite.float().abs() < 1], torch.cat([subnormal, finite[finite == 0]])):
        q, scale = FP8.quantize_weight(w)
        assert torch.equal(scale, textbook_scale(w)) and scale.dtype == torch.float32 and scale.shape == ()
        assert torch.equal(q.view(torch.uint8), textbook(w, scale))
        if scale > 1e-12:  # not clamped (bf16 subnormals / 448 fall below 1e-12): the largest lands on 448
            assert q.float().abs().max() == 448.0


@pytest.mark.parametrize("dtype", HALF)
def test_inf_and_nan_weights_give_what_the_float32_division_gives(dtype):
    w = (torch.randn(50, 40) * 0.02).to(dtype)
    w[3, 7] = float("inf")
    q, scale = FP8.quantize_weight(w)
    assert scale == float("inf")
    codes = q.view(torch.uint8)
    assert codes[3, 7] in (0x7F, 0xFF) and (codes.view(-1)[torch.arange(w.numel()) != 3 * 40 + 7] & 0x7F == 0).all()
    w[3, 7] = float("nan")
    q, scale = FP8.quantize_weight(w)
    assert scale.isnan() and ((q.view(torch.uint8) & 0x7F) == 0x7F).all()  # everything NaN, as x / NaN is


@pytest.mark.parametrize("dtype", HALF)
def test_chunk_boundaries_do_not_change_the_bytes(dtype, monkeypatch):
    g = torch.Generator().manual_seed(5)
    w = (torch.randn(3, 70_001, generator=g) * 0.02).to(dtype)
    w[1, 5] = -w.abs().max() * 1.5  # the absolute maximum is negative
    whole = FP8.quantize_weight(w)
    monkeypatch.setattr(FP8, "_QUANT_CHUNK", 1000)  # 211 chunks, the last one short
    chunked = FP8.quantize_weight(w)
    assert torch.equal(whole[1], chunked[1]) and torch.equal(whole[0].view(torch.uint8), chunked[0].view(torch.uint8))
    assert torch.equal(chunked[0].view(torch.uint8), textbook(w, textbook_scale(w)))


def test_strided_and_grad_tracking_inputs():
    w = (torch.randn(96, 80) * 0.1).bfloat16()
    q, scale = FP8.quantize_weight(w.t())  # not contiguous
    assert q.shape == (80, 96) and torch.equal(q.view(torch.uint8), textbook(w.t(), scale))
    p = torch.nn.Parameter(w.clone())
    assert torch.equal(FP8.quantize_weight(p)[0].view(torch.uint8), FP8.quantize_weight(w)[0].view(torch.uint8))


def test_loading_a_bf16_file_as_fp8_stores_the_formula_bytes(tmp_path):
    tiny = PRESETS["tiny"]
    reference = randomize_(build_dit(tiny), seed=31, scale=0.05)
    stored = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in reference.state_dict().items()}
    save_sharded(stored, tmp_path)
    model = load_dit(tmp_path, dtype=torch.bfloat16, weight_format="fp8")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, FP8.FP8Linear)}
    assert len(layers) == tiny.num_layers * 12
    for name, layer in layers.items():
        w = stored[name + ".weight"]
        assert torch.equal(layer.scale_weight, textbook_scale(w))
        assert torch.equal(layer.weight.view(torch.uint8), textbook(w, textbook_scale(w)))

"""The official start noise: torch 2.1's CPU bf16 ``randn``, reproduced with any installed torch.

The reference below is a second, scalar implementation of the C++ in
pytorch/pytorch ``aten/src/ATen/native/cpu/DistributionTemplates.h`` (``normal_fill<BFloat16>`` and
``normal_fill_16``, as in the torch 2.x releases before the float32 rewrite): generator words come from
numpy's MT19937 (``RandomState(seed)`` seeds it like ``torch.Generator().manual_seed``), rounding is done
bit by bit with ``struct``. It shares no code with ``bindweave_core.noise``.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch

from bindweave_core.noise import official_bf16_randn


def f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


def bf16(x: float) -> float:
    """float -> float32 (RNE) -> bfloat16 (RNE on the upper 16 bits), as c10::BFloat16(float) does."""
    bits = struct.unpack("<I", struct.pack("<f", f32(x)))[0]
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def reference(n: int, seed: int, mean: float = 0.0, std: float = 1.0) -> list[float]:
    """``normal_fill<BFloat16>(data, mean, std)``: every operation on BFloat16 values rounds to bf16."""
    words = np.random.RandomState(seed).randint(0, 2**32, size=n + 16, dtype=np.uint32).tolist()
    data = [(w & 255) / 256 for w in words[:n]]

    def fill16(block: list[float]) -> list[float]:
        out = list(block)
        for j in range(8):
            u1 = bf16(1 - block[j])
            u2 = block[j + 8]
            radius = bf16(math.sqrt(bf16(-2 * bf16(math.log(u1)))))
            theta = bf16(2.0 * math.pi * u2)
            out[j] = bf16(bf16(bf16(radius * bf16(math.cos(theta))) * std) + mean)
            out[j + 8] = bf16(bf16(bf16(radius * bf16(math.sin(theta))) * std) + mean)
        return out

    for i in range(0, n - 15, 16):
        data[i:i + 16] = fill16(data[i:i + 16])
    if n % 16:
        data[n - 16:] = fill16([(w & 255) / 256 for w in words[n:n + 16]])
    return data


@pytest.mark.parametrize("shape,seed", [((1, 16, 2, 2, 3), 1234), ((3, 7, 5), 0), ((16,), 42)])
def test_official_noise_matches_the_scalar_reference(shape, seed):
    ours = official_bf16_randn(shape, seed)
    assert ours.dtype == torch.bfloat16 and ours.shape == shape
    expected = torch.tensor(reference(math.prod(shape), seed), dtype=torch.float64)
    assert same_bits(ours.flatten(), expected)


def same_bits(ours: torch.Tensor, expected: torch.Tensor) -> bool:
    """Bit equality (``torch.equal`` takes -0.0 == +0.0; the sign of zero is part of the draw)."""
    return torch.equal(ours.view(torch.int16), expected.to(torch.bfloat16).view(torch.int16))


def test_official_noise_of_a_480p_latent_has_no_negative_zero():
    """torch 2.1's kernel ends with ``* std + mean``: a zero radius gives +0.0, never -0.0."""
    shape = (1, 16, 21, 60, 104)  # 81 frames at 832x480
    ours = official_bf16_randn(shape, 1234).flatten()
    zeros = ours == 0
    assert int(zeros.sum()) > 1000  # u1 = 1 happens once in 256 pairs: the draw has zeros to get the sign of
    assert int(torch.signbit(ours[zeros]).sum()) == 0
    # the first 64 Ki values bit for bit against the scalar reference (the blocks are drawn in order)
    head = 1 << 16
    expected = torch.tensor(reference(head, 1234), dtype=torch.float64)
    assert int(torch.signbit(expected[expected == 0]).sum()) == 0 and int((expected == 0).sum()) > 50
    assert same_bits(ours[:head], expected)


def test_numpy_words_are_torch_generator_words():
    """The reference's premise: numpy's MT19937(seed) gives the words torch's CPU generator consumes."""
    words = np.random.RandomState(7).randint(0, 2**32, size=64, dtype=np.uint32)
    uniform = torch.rand(64, generator=torch.Generator().manual_seed(7))  # (word & (2^24 - 1)) / 2^24
    assert np.array_equal((uniform.double() * 2**24).long().numpy(), words & (2**24 - 1))


def test_official_noise_is_the_coarse_old_kernel_not_the_installed_one():
    noise = official_bf16_randn((1, 16, 4, 16, 16), 1234).float()
    assert noise.abs().max() <= math.sqrt(-2 * math.log(1 / 256)) + 0.01  # ~3.33: 8-bit uniforms
    assert noise.unique().numel() < 3000  # bf16 Box-Muller on 256 x 256 uniform pairs
    assert abs(noise.mean()) < 0.02 and abs(noise.std() - 1) < 0.02

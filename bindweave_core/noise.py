"""The official start noise: ``torch.randn(shape, dtype=bfloat16, generator=<CPU, seed>)`` as torch 2.1 drew it.

The official run draws its noise in bf16 from a CPU generator (spec section 10). Up to at least torch 2.7
the CPU kernel did that in bf16 itself (``aten/src/ATen/native/cpu/DistributionTemplates.h``,
``normal_kernel`` -> ``normal_fill<BFloat16>``): one generator word per value, keeping only the low 8 bits
as the uniform (``(r & 255) / 256``, bf16 having 8 significant bits), then Box-Muller on pairs
``(j, j + 8)`` of each block of 16 with every operation rounded to bf16; when the size is not a multiple
of 16 the last 16 values are redrawn and recomputed. (That is why CPU bf16 ``randn`` never leaves about
+-3.33: pytorch/pytorch issue 166853, seen on torch 2.7.1.) Newer torch computes in float32 instead, so
the installed torch would give other noise for the same seed; this module reproduces the old numbers
with any torch. Each libm call (``logf``, ``sqrtf``, ``cosf``, ``sinf``) is taken as correctly rounded
to float32 before the bf16 rounding. The kernel ends each value with ``* std + mean`` (1 and 0 here): that
changes no value but turns a ``-0.0`` (a zero radius times a positive cosine) into ``+0.0``, so the old
kernel never returned a negative zero and neither does this one.
"""

from __future__ import annotations

import math

import torch

TWO_PI = 2.0 * math.pi  # 2.0f * c10::pi<double>: a double


def _bf16(x: torch.Tensor) -> torch.Tensor:
    """Round float64 values as C++ does when it stores a float result in a BFloat16 (float first, then RNE)."""
    return x.to(torch.float32).to(torch.bfloat16).to(torch.float64)


def _box_muller(block: torch.Tensor, std: float = 1.0, mean: float = 0.0) -> torch.Tensor:
    """``normal_fill_16<BFloat16>`` on ``[m, 16]`` uniforms (float64 holding bf16 values)."""
    u1 = _bf16(1 - block[:, :8])  # [0, 1) -> (0, 1]
    u2 = block[:, 8:]
    radius = _bf16(torch.sqrt(_bf16(-2 * _bf16(torch.log(u1)))))
    theta = _bf16(TWO_PI * u2)  # double product, stored in a BFloat16
    # ``radius * cos(theta) * std + mean``, each BFloat16 operation rounded: the ``+ mean`` makes -0.0 +0.0
    first = _bf16(_bf16(_bf16(radius * _bf16(torch.cos(theta))) * std) + mean)
    second = _bf16(_bf16(_bf16(radius * _bf16(torch.sin(theta))) * std) + mean)
    return torch.cat([first, second], dim=1)


def _uniforms(generator: torch.Generator, n: int) -> torch.Tensor:
    # randint over [0, 256) takes one 32-bit word per value and keeps ``word % 256`` = ``word & 255``:
    # the same words and bits as uniform_real_distribution<BFloat16>.
    return torch.randint(0, 256, (n,), generator=generator, dtype=torch.int64).to(torch.float64) / 256


def official_bf16_randn(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """bf16 standard-normal noise, value for value what torch 2.1's CPU ``randn`` in bf16 gave for ``seed``."""
    n = math.prod(shape)
    generator = torch.Generator("cpu").manual_seed(int(seed))
    if n < 16:  # torch's element-wise path (double Box-Muller with a cached sample); never a latent shape
        return torch.randn(shape, generator=generator, dtype=torch.bfloat16)
    data = _uniforms(generator, n)
    full = n // 16 * 16
    data[:full] = _box_muller(data[:full].view(-1, 16)).flatten()
    if n % 16:
        data[n - 16:] = _box_muller(_uniforms(generator, 16).view(1, 16)).flatten()
    return data.view(shape).to(torch.bfloat16)

"""What keeping a GGUF DiT quantised costs: dequantising one linear weight per call, against the
matmul it feeds, in one process.

For each GGUF type, a ``--dim`` x ``--dim`` weight (Wan 14B: 5120) is quantised (Q8_0 by gguf itself,
the K types as random blocks: dequantisation time does not depend on the values), then timed:
dequantisation (``dit.gguf_linear`` / ``checkpoints.gguf_io``, in torch on ``--device``) and the
``x @ W.T`` matmul for ``--tokens`` activations. The ratio is the extra time per
linear layer call relative to the matmul of a bf16/fp32 model.

    python benchmarks/gguf_dequant.py --dim 5120 --tokens 4096 --device cuda
    python benchmarks/gguf_dequant.py --dim 2048 --tokens 1024            # CPU, small
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bindweave_core.checkpoints.gguf_io import dequantize  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn, device: torch.device, repeats: int) -> float:
    fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / repeats


def raw_blocks(name: str, dim: int, rng: np.random.Generator) -> np.ndarray:
    import gguf

    qtype = gguf.GGMLQuantizationType[name]
    if name == "Q8_0":
        return gguf.quants.quantize(rng.standard_normal((dim, dim), dtype=np.float32), qtype)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(dim, dim // block, size), dtype=np.uint8)
    scales = np.full((dim, dim // block, 1), 1e-3, dtype=np.float16).view(np.uint8)  # 2 bytes each
    if name == "Q6_K":
        raw[..., -2:] = scales
    else:
        raw[..., 0:2] = scales[..., 0:2]
        raw[..., 2:4] = scales[..., 0:2]
    return raw.reshape(dim, -1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--types", nargs="+", default=["Q8_0", "Q6_K", "Q5_K", "Q4_K"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rng = np.random.default_rng(0)
    x = torch.randn(args.tokens, args.dim, device=device, dtype=dtype)
    w = torch.randn(args.dim, args.dim, device=device, dtype=dtype)
    matmul = seconds(lambda: x @ w.T, device, args.repeats)
    print(f"dim {args.dim}, {args.tokens} tokens, {device} {str(dtype).replace('torch.', '')}: "
          f"matmul {matmul * 1e3:.2f} ms")
    print(f"{'type':<6} {'dequantise ms':>14} {'dequantise / matmul':>20}")
    for name in args.types:
        raw = torch.from_numpy(raw_blocks(name, args.dim, rng).reshape(-1)).to(device)
        t = seconds(lambda raw=raw, name=name: dequantize(raw, name, (args.dim, args.dim)).to(dtype), device, args.repeats)
        print(f"{name:<6} {t * 1e3:>14.2f} {t / matmul:>20.2f}")


if __name__ == "__main__":
    main()

"""Peak resident memory of loading a DiT checkpoint, relative to the checkpoint's size.

Writes a synthetic checkpoint with 14B-width tensors (dim 5120, ffn 13824; a few blocks, so it
is >= 1 GB), then loads it in fresh processes with ``load_dit`` and touches every weight (so the
whole model really is resident) before reading the peak RSS. Target: peak / file size <= 1.25.

    python benchmarks/load_memory.py [--layers 3] [--dtype bf16] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bindweave_core.checkpoints.writers import save_sharded  # noqa: E402
from bindweave_core.config import PRESETS  # noqa: E402
from bindweave_core.dit.transformer import BindWeaveTransformer  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def status_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process. ru_maxrss is no good here: after fork+exec it
    starts from the parent's peak, and the parent has just held the whole checkpoint in memory."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def write_checkpoint(directory: Path, layers: int, dtype: torch.dtype) -> int:
    cfg = PRESETS["bindweave-14b"].replace(num_layers=layers)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in BindWeaveTransformer(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    tensors = {k: (torch.randn(s, generator=g) * 0.02).to(dtype) for k, s in shapes.items()}
    save_sharded(tensors, directory, max_shard_bytes=2 << 30)
    del tensors
    os.sync()  # measure loading a file at rest on disk, not one still being written back
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def child(path: str, dtype: str, weight_format: str) -> None:
    from bindweave_core.checkpoints.dit_loader import load_dit

    baseline = status_bytes("VmRSS")
    t0 = time.perf_counter()
    model = load_dit(path, dtype=DTYPES[dtype], weight_format=weight_format)
    seconds = time.perf_counter() - t0
    # page every weight in, without allocating a copy of any of them
    touched = sum(float(p.view(torch.uint8).max()) for p in model.parameters())
    peak = status_bytes("VmHWM")
    print(json.dumps({"baseline": baseline, "peak": peak, "seconds": seconds, "checksum": touched}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="dtype stored in the file")
    ap.add_argument("--keep", help="write the checkpoint here and keep it")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return

    directory = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bw_load_memory_"))
    directory.mkdir(parents=True, exist_ok=True)
    try:
        size = write_checkpoint(directory, args.layers, DTYPES[args.dtype])
        print(f"checkpoint: {size / 1e9:.2f} GB, {args.dtype}, {args.layers} blocks at 14B width (dim 5120, ffn 13824)")
        cases = [(args.dtype, "default", "same dtype"), ("fp32" if args.dtype != "fp32" else "bf16", "default", "cast"),
                 ("bf16", "fp8", "quantised to fp8 storage")]
        for dtype, fmt, label in cases:
            out = subprocess.run([sys.executable, __file__, "--child", str(directory), dtype, fmt],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            model_bytes = size * (torch.finfo(DTYPES[dtype]).bits / torch.finfo(DTYPES[args.dtype]).bits
                                  if fmt == "default" else 0.5 * 16 / torch.finfo(DTYPES[args.dtype]).bits)
            print(f"load -> {dtype:<4} {fmt:<7} ({label}): {r['seconds']:.1f} s, peak RSS {r['peak'] / 1e9:.2f} GB = "
                  f"{r['peak'] / size:.2f} x file size; above the {r['baseline'] / 1e9:.2f} GB interpreter "
                  f"baseline {(r['peak'] - r['baseline']) / size:.2f} x file, "
                  f"{(r['peak'] - r['baseline']) / model_bytes:.2f} x the loaded model")
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Peak resident memory of loading a DiT checkpoint, relative to the checkpoint's size.

Writes a synthetic checkpoint with 14B-width tensors (dim 5120, ffn 13824; a few blocks, so it
is >= 1 GB), then loads it in fresh processes with ``load_dit`` and touches every weight (so the
whole model really is resident) before reading the peak RSS. Target: peak / file size <= 1.25.

``--compare-quantize`` times the bf16 -> fp8 load with the quantiser it replaced (row chunks of
float32 copies, kept below as the reference) and with the current one, alternately, ``--repeats``
times each, and prints the ratio of the best times (wall and CPU), for the whole load and for the
time spent inside the quantiser alone, and whether all produced the same fp8 bytes and scales.
``--quantizers reference,current,lookup`` adds a tried alternative (a 65536-entry table gather).
The machine may be shared, so only same-run, back-to-back figures mean anything.

    python benchmarks/load_memory.py [--layers 3] [--dtype bf16] [--keep DIR] [--compare-quantize]
                                     [--repeats 3] [--quantizers reference,current,lookup]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
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


def reference_quantize_weight(weight: torch.Tensor, rows_per_chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """The quantiser before the current one (for --compare-quantize): row chunks through float32 copies."""
    chunks = weight.split(rows_per_chunk)
    amax = torch.stack([c.abs().amax().float() for c in chunks]).amax()
    scale = (amax / 448.0).clamp(min=1e-12)
    out = torch.empty(weight.shape, dtype=torch.float8_e4m3fn, device=weight.device)
    for dst, src in zip(out.split(rows_per_chunk), chunks):
        dst.copy_(src.float() / scale)
    return out, scale.reshape(())


def lookup_quantize_weight(weight: torch.Tensor, rows_per_chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A tried alternative (``--quantizers ...,lookup``): bf16/fp16 have only 65536 bit patterns, so the
    float32 division and e4m3 rounding are run once per pattern (the same ops: identical bytes) and the
    weight is converted by one gather of its patterns (numpy, in tasks over torch.get_num_threads()
    threads). On 2 AVX2 cores it was no faster than the elementwise path when the cores were free (the
    gather costs about what torch's float32 -> e4m3 cast does), faster only when they were shared."""
    from bindweave_core.fp8 import FP8_DTYPE, FP8_MAX, quantize_weight, tensor_amax

    if weight.device.type != "cpu" or weight.dtype not in (torch.bfloat16, torch.float16):
        return quantize_weight(weight)
    scale = (tensor_amax(weight) / FP8_MAX).clamp(min=1e-12)
    values = torch.arange(1 << 16, dtype=torch.int32).to(torch.uint16).view(weight.dtype).float()
    table = values.div_(scale).to(FP8_DTYPE).view(torch.uint8).numpy()
    patterns = weight.detach().contiguous().view(torch.uint16).reshape(-1).numpy()
    out = torch.empty(weight.shape, dtype=FP8_DTYPE)
    codes, task, step = out.view(torch.uint8).reshape(-1).numpy(), 1 << 20, 1 << 15

    def gather(start: int) -> None:
        index = np.empty(step, dtype=np.intp)
        for lo in range(start, min(start + task, patterns.size), step):
            n = min(step, start + task - lo, patterns.size - lo)
            index[:n] = patterns[lo: lo + n]
            np.take(table, index[:n], out=codes[lo: lo + n], mode="wrap")

    with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
        list(pool.map(gather, range(0, patterns.size, task)))
    return out, scale.reshape(())


QUANTIZERS = {"reference": reference_quantize_weight, "lookup": lookup_quantize_weight}


def cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(quantize, totals: dict[str, float]):
    """``quantize`` that adds its wall and process CPU seconds (all threads) to ``totals``."""
    def run(weight: torch.Tensor, *args, **kwargs):
        t0, c0 = time.perf_counter(), cpu_seconds()
        result = quantize(weight, *args, **kwargs)
        totals["quantize_seconds"] += time.perf_counter() - t0
        totals["quantize_cpu_seconds"] += cpu_seconds() - c0
        return result
    return run


def child(path: str, dtype: str, weight_format: str, quantizer: str = "current") -> None:
    from bindweave_core.checkpoints import materialize
    from bindweave_core.dit.loading import load_dit

    totals = {"quantize_seconds": 0.0, "quantize_cpu_seconds": 0.0}
    base = QUANTIZERS.get(quantizer, materialize.quantize_weight)
    materialize.quantize_weight = timed(base, totals)
    baseline = status_bytes("VmRSS")
    t0, c0 = time.perf_counter(), cpu_seconds()
    model = load_dit(path, dtype=DTYPES[dtype], weight_format=weight_format)
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    # page every weight in, without allocating a copy of any of them
    touched = sum(float(p.view(torch.uint8).max()) for p in model.parameters())
    # sha256 of every quantised byte and every scale's bytes, by name (equal digests: the quantisers agree)
    digest, scales = hashlib.sha256(), hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if p.dtype == torch.float8_e4m3fn:
            digest.update(name.encode() + p.detach().contiguous().view(torch.uint8).numpy().tobytes())
    for name, b in sorted(model.named_buffers()):
        if name.endswith("scale_weight"):
            scales.update(name.encode() + b.detach().float().reshape(-1).view(torch.uint8).numpy().tobytes())
    digest, scales = digest.hexdigest(), scales.hexdigest()
    peak = status_bytes("VmHWM")
    print(json.dumps({"baseline": baseline, "peak": peak, "seconds": seconds, "cpu_seconds": cpu,
                      "checksum": touched, "fp8_digest": digest, "scale_digest": scales, **totals}))


def compare_quantize(directory: Path, size: int, repeats: int, quantizers: list[str]) -> None:
    runs: dict[str, list[dict]] = {q: [] for q in quantizers}
    for _ in range(repeats):
        for quantizer in quantizers:
            out = subprocess.run([sys.executable, __file__, "--child", str(directory), "bf16", "fp8", quantizer],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            runs[quantizer].append(r)
            print(f"  load -> fp8 with the {quantizer:9s} quantiser: {r['seconds']:.1f} s wall, "
                  f"{r['cpu_seconds']:.1f} s CPU; of which quantising {r['quantize_seconds']:.1f} s wall, "
                  f"{r['quantize_cpu_seconds']:.1f} s CPU", flush=True)
    same = all(r[k] == runs[quantizers[0]][0][k] for rs in runs.values() for r in rs for k in ("fp8_digest", "scale_digest"))
    for label, wall, cpu in (("whole load", "seconds", "cpu_seconds"),
                             ("quantising alone", "quantize_seconds", "quantize_cpu_seconds")):
        best = {q: (min(r[wall] for r in rs), min(r[cpu] for r in rs)) for q, rs in runs.items()}
        ref_wall, ref_cpu = best[quantizers[0]]
        print(f"bf16 -> fp8 of {size / 1e9:.2f} GB, {label} (best of {repeats}): {quantizers[0]} {ref_wall:.2f} s wall / "
              f"{ref_cpu:.2f} s CPU; " + "; ".join(
                  f"{q} {w:.2f} s / {c:.2f} s = {ref_wall / w:.1f}x wall, {ref_cpu / c:.1f}x CPU"
                  for q, (w, c) in best.items() if q != quantizers[0]))
    print(f"same fp8 bytes and scales: {same}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="dtype stored in the file")
    ap.add_argument("--keep", help="write the checkpoint here and keep it")
    ap.add_argument("--compare-quantize", action="store_true",
                    help="time bf16 -> fp8 loading with the previous and the current quantiser, alternately")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quantizers", default="reference,current",
                    help="with --compare-quantize: which quantisers, the first one the baseline "
                         f"(current, {', '.join(QUANTIZERS)})")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return

    directory = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bw_load_memory_"))
    directory.mkdir(parents=True, exist_ok=True)
    try:
        existing = sorted(directory.glob("*.safetensors"))
        if args.keep and existing:  # reuse a checkpoint kept by an earlier run
            size = sum(f.stat().st_size for f in existing)
        else:
            size = write_checkpoint(directory, args.layers, DTYPES[args.dtype])
        if args.compare_quantize:
            print(f"checkpoint: {size / 1e9:.2f} GB bf16 at 14B width", flush=True)
            compare_quantize(directory, size, args.repeats, args.quantizers.split(","))
            return
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

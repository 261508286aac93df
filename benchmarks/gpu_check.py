"""One GPU check of the speed and memory paths, random weights, no downloads (<= ~8 min on one H100/H200).

Sections (the JSON file is rewritten as each one ends, so a timeout keeps what ran; a section that
fails records its error and the next one still runs):

1. ``environment``: torch / diffusers / kernel package versions, the GPU and its compute capability,
   and what ``auto``, ``sage`` and ``flash`` resolve to here (with the reason for each fallback);
2. ``scaled_mm``: ``torch._scaled_mm`` alone at the 14B shapes (480p tokens x 5120 -> 5120 and
   -> 13824): error vs the bf16 matmul and speed, for dynamic and static activation scales and fast
   accumulation;
3. ``parity``: a 2-block DiT at 14B width and 480p tokens against its float32 SDPA output: bf16 with
   sdpa / sage / flash, fp8 upcast and fp8 fast, block offload with 0 resident blocks, compiled blocks;
4. ``full``: the 40-block DiT at 480p (cond + uncond batched): s/step, TFLOP/s, peak allocated and
   reserved vs the memory estimate, and the ratio to diffusers' ``WanTransformer3DModel`` holding the
   same tensors, in the same run;
5. ``capped``: memory capped at 22.5 GiB (``set_per_process_memory_fraction``, a 24 GB card): fp8 at
   480p without and with block offload, and 720p with 16 resident blocks.

    python benchmarks/gpu_check.py [--out gpu_check.json]
    python benchmarks/gpu_check.py --smoke     # the same code on the CPU at a tiny width, in seconds (tests)
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dit_speed as S  # noqa: E402

from bindweave_core import constants as C  # noqa: E402
from bindweave_core import fp8 as FP8  # noqa: E402
from bindweave_core.config import PRESETS  # noqa: E402
from bindweave_core.dit import attention as A  # noqa: E402
from bindweave_core.dit.compile import compile_blocks  # noqa: E402
from bindweave_core.dit.offload import enable_block_offload  # noqa: E402
from bindweave_core.memory import GiB, RunShape, estimate_vram, token_count  # noqa: E402

CAP_GIB = 22.5


class Check:
    """Collects the sections' results and rewrites the JSON file after each one."""

    def __init__(self, out: Path, smoke: bool):
        self.out, self.smoke = out, smoke
        self.results: dict = {"smoke": smoke, "sections": {}}

    def section(self, name: str, fn) -> None:
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            data, status = fn(), "ok"
        except Exception as e:  # keep going: the next section may still tell something
            data, status = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=4)}, "error"
            print(f"   {name} failed: {type(e).__name__}: {e}", flush=True)
        data = {"status": status, "seconds": round(time.perf_counter() - t0, 2), **data}
        self.results["sections"][name] = data
        tmp = self.out.with_suffix(self.out.suffix + ".tmp")
        tmp.write_text(json.dumps(self.results, indent=1, default=str))
        tmp.replace(self.out)
        for key, value in data.items():
            if key not in ("traceback",):
                print(f"   {key}: {value}", flush=True)


def rel_rms(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    return ((out - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def timed(fn, device: torch.device, repeats: int) -> float:
    fn()
    S.sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    S.sync(device)
    return (time.perf_counter() - t0) / repeats


# ---------------------------------------------------------------------------------- sections
def environment(device: torch.device, head_dim: int) -> dict:
    import diffusers

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "diffusers": diffusers.__version__, "device": str(device),
            "sageattention": A._installed_version("sage"), "flash_attn": A._installed_version("flash")}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        info["memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / GiB, 1)
    backends = {}
    for requested in ("auto", "sage", "flash"):
        A.resolve_backend.cache_clear()
        backends[requested] = {
            "runs": A.resolve_backend(requested, device.type, torch.bfloat16, head_dim, device.index),
            "reason": None if requested == "auto" else A.unavailable_reason(requested, device.type, torch.bfloat16,
                                                                             head_dim, device.index)}
    info["backends"] = backends
    info["scaled_mm"] = FP8._scaled_mm_reason(device.type, device.index, torch.bfloat16) or "available"
    return info


def scaled_mm(device: torch.device, tokens: int, dim: int, ffn: int, repeats: int) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(tokens, dim, generator=g).to(device, torch.bfloat16)
    out = {}
    for name, n_out in (("qkvo", dim), ("ffn_in", ffn)):
        w = (torch.randn(n_out, dim, generator=g) / math.sqrt(dim)).to(device, torch.bfloat16)
        wq, ws = FP8.quantize_weight(w)
        upcast = (wq.float() * ws).to(torch.bfloat16)
        ref = x @ upcast.t()
        row = {"shape": [tokens, dim, n_out], "bf16_ms": 1e3 * timed(lambda upcast=upcast: x @ upcast.t(), device, repeats)}
        flops = 2 * tokens * dim * n_out
        row["bf16_tflops"] = flops / row["bf16_ms"] / 1e9
        for label, scale, fast in (("dynamic", "dynamic", False), ("static", "static", False),
                                   ("dynamic_fast_accum", "dynamic", True)):
            try:
                def fn(wq=wq, ws=ws, scale=scale, fast=fast):
                    return FP8.scaled_mm_linear(x, wq, ws, activation_scale=scale, fast_accum=fast)

                row[f"{label}_rel_rms"] = rel_rms(fn(), ref)
                row[f"{label}_ms"] = 1e3 * timed(fn, device, repeats)
                row[f"{label}_speedup"] = row["bf16_ms"] / row[f"{label}_ms"]
            except (RuntimeError, NotImplementedError) as e:
                row[label] = f"unavailable: {e}"
        out[name] = row
        del w, wq, upcast, ref
    return out


def _copy_of(reference, cfg, dtype, device):
    model = S.random_dit(cfg, dtype, device, seed=1)
    model.load_state_dict(reference.state_dict())  # the reference's values, cast
    return model


def parity(device: torch.device, cfg, width: int, height: int, frames: int, compile_backend: str) -> dict:
    cfg2 = cfg.replace(num_layers=2)
    reference = S.random_dit(cfg2, torch.float32, device)
    reference.set_attention_backend("sdpa")
    inputs32, _ = S.make_inputs(cfg2, width, height, frames, 1, 64, torch.float32, device)
    with torch.no_grad():
        ref = reference(*inputs32["args"], **inputs32["kwargs"]).float()
    inputs16, _ = S.make_inputs(cfg2, width, height, frames, 1, 64, torch.bfloat16, device)
    rows = {"tokens": token_count(width, height, frames)}

    def run(model, backend="sdpa"):
        model.set_attention_backend(backend)
        with torch.no_grad():
            return rel_rms(model(*inputs16["args"], **inputs16["kwargs"]), ref)

    model = _copy_of(reference, cfg2, torch.bfloat16, device)
    del reference
    free_memory(device)
    for backend in ("sdpa", "sage", "flash"):
        A.resolve_backend.cache_clear()
        rows[f"bf16_{backend}"] = {"runs": A.resolve_backend(backend, device.type, torch.bfloat16, cfg.head_dim,
                                                             device.index), "rel_rms": run(model, backend)}
    offload = enable_block_offload(model, 0, device)
    rows["bf16_offload_0_resident"] = {"rel_rms": run(model), "uploads": offload.uploads,
                                       "host_over_streamed": offload.host_bytes() / max(offload.streamed_bytes(), 1),
                                       "pinned_over_streamed": offload.pinned_bytes() / max(offload.streamed_bytes(), 1)}
    offload.remove()
    model.to(device)
    torch._dynamo.reset()
    compile_blocks(model, backend=compile_backend)
    rows[f"bf16_compiled_{compile_backend}"] = {"rel_rms": run(model)}
    torch._dynamo.reset()
    del model
    free_memory(device)
    fp8_model = S.random_dit(cfg2, torch.bfloat16, device, seed=1)
    fp8_model.load_state_dict(S.random_dit(cfg2, torch.float32, device).state_dict())
    FP8.convert_to_fp8(fp8_model)
    rows["fp8_upcast"] = {"rel_rms": run(fp8_model)}
    for scale in FP8.FP8_ACTIVATION_SCALES:
        FP8.set_fp8_matmul(fp8_model, "scaled_mm", activation_scale=scale)
        rows[f"fp8_fast_{scale}"] = {"rel_rms": run(fp8_model)}
    return rows


def full(device: torch.device, cfg, width: int, height: int, frames: int, steps: int, planner_tokens: int) -> dict:
    model = S.random_dit(cfg, torch.bfloat16, device)
    model.set_attention_backend("sdpa")
    ours, theirs = S.make_inputs(cfg, width, height, frames, 2, planner_tokens, torch.bfloat16, device)
    tokens = token_count(width, height, frames)
    flops = S.step_flops(cfg, tokens, C.CLIP_CONTEXT_TOKENS + planner_tokens + C.TEXT_LEN, 2)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_ours, peak = S.time_steps(model, ours, 1, steps, 1, device)
    reserved = torch.cuda.max_memory_reserved(device) / GiB if device.type == "cuda" else float("nan")
    est = estimate_vram(cfg, RunShape(width, height, frames, batch=2, dtype=torch.bfloat16,
                                      planner_tokens=planner_tokens))
    twin = S.diffusers_twin(model, "sdpa")
    t_theirs, _ = S.time_steps(twin, theirs, 1, steps, 1, device)
    return {"size": f"{width}x{height}", "tokens": tokens, "blocks": cfg.num_layers, "s_per_step": t_ours,
            "tflops": flops / t_ours / 1e12, "peak_allocated_gib": peak, "peak_reserved_gib": reserved,
            "estimate_gib": est.total / GiB, "estimate_over_peak": est.total / GiB / peak if peak == peak else None,
            "diffusers_s_per_step": t_theirs, "ratio_to_diffusers": t_ours / t_theirs}


def capped(device: torch.device, cfg, sizes: dict, frames: int, steps: int, cap_gib: float | None) -> dict:
    """fp8 weights made block by block on the device (never a bf16 copy of the model there)."""
    if cap_gib is not None and device.type == "cuda":
        free_memory(device)
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * GiB / total), device)
    out = {"cap_gib": cap_gib}
    try:
        for label, (w, h, resident) in sizes.items():
            model = S.random_dit(cfg, torch.bfloat16, torch.device("cpu"))
            FP8.convert_to_fp8(model)
            row = {"size": f"{w}x{h}", "resident_blocks": resident}
            try:
                if resident is None:
                    model.to(device)
                else:
                    enable_block_offload(model, resident, device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                inputs, _ = S.make_inputs(cfg, w, h, frames, 1, 64, torch.bfloat16, device)
                t, peak = S.time_steps(model, inputs, 2, steps, 1, device)  # cond and uncond as separate calls
                est = estimate_vram(cfg, RunShape(w, h, frames, batch=1, dtype=torch.bfloat16, weight_format="fp8",
                                                  resident_blocks=resident))
                row.update(s_per_step=t, peak_allocated_gib=peak, estimate_gib=est.total / GiB,
                           fits=t == t)
            except torch.OutOfMemoryError as e:
                row.update(fits=False, error=str(e).splitlines()[0])
            out[label] = row
            del model
            free_memory(device)
    finally:
        if cap_gib is not None and device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0, device)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny width: checks the script itself in seconds")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.smoke:
        device = torch.device("cpu")
        torch.set_num_threads(min(2, torch.get_num_threads()))
        cfg = PRESETS["tiny"].replace(num_layers=3)
        cfg = cfg.replace(num_heads=2, head_dim=64, ffn_dim=256)  # dim 128
        size, frames, tokens_mm, steps, compile_backend, cap = (64, 64), 5, 96, 1, "eager", None
        cap_sizes = {"fp8_no_offload": (64, 64, None), "fp8_offload_1": (64, 64, 1), "fp8_big_offload_1": (96, 64, 1)}
    else:
        device = torch.device(args.device)
        cfg = PRESETS["bindweave-14b"]
        size, frames, tokens_mm, steps, compile_backend, cap = (832, 480), C.DEFAULT_FRAMES, None, args.steps, \
            "inductor", CAP_GIB
        cap_sizes = {"fp8_480p_no_offload": (832, 480, None), "fp8_480p_36_resident": (832, 480, 36),
                     "fp8_720p_16_resident": (1280, 720, 16)}
    tokens_mm = tokens_mm or token_count(*size, frames)
    torch.set_flush_denormal(True)
    check = Check(Path(args.out), args.smoke)
    check.section("environment", lambda: environment(device, cfg.head_dim))
    check.section("scaled_mm", lambda: scaled_mm(device, tokens_mm, cfg.dim, cfg.ffn_dim, 1 if args.smoke else 5))
    check.section("parity", lambda: parity(device, cfg, *size, frames, compile_backend))
    free_memory(device)
    check.section("full", lambda: full(device, cfg, *size, frames, steps, 64 if args.smoke else 600))
    free_memory(device)
    check.section("capped", lambda: capped(device, cfg, cap_sizes, frames, steps, cap))
    failed = [k for k, v in check.results["sections"].items() if v["status"] != "ok"]
    print(f"wrote {args.out}; sections failed: {failed or 'none'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

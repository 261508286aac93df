"""Seconds per denoising step and peak memory of the DiT, per attention backend and weight format,
against diffusers' ``WanTransformer3DModel`` at the same size and settings, in one process.

The models get random weights (timings do not depend on their values), built on the meta device
and filled one tensor at a time on the target device, so the 14B size needs no checkpoint and no
second copy in RAM. diffusers' model shares our tensors (no second copy either) and gets the same
number of tokens: the 4 reference slots + 21 video frames (81 frames), 1028 CLIP tokens and
``--planner-tokens`` + 512 text tokens. One step = guidance 5 = the cond and the uncond branch
(``--cfg batched``: one batch-2 call, ``separate``: two batch-1 calls, ``none``: one call).

GPU (the acceptance table; run on one H100):

    python benchmarks/dit_speed.py --preset bindweave-14b --resolution 480p 720p --steps 3 \\
        --backends sdpa sage --formats bf16 fp8 fp8_fast

CPU (shows it works; small size):

    python benchmarks/dit_speed.py --preset tiny --layers 2 --dim 512 --head-dim 128 --resolution 416x240 \\
        --frames 17 --formats fp32 bf16 fp8 fp8_fast --backends sdpa sage --steps 3

``--estimate-only`` prints the memory estimator's table (no model is built).

The ratio includes the BindWeave connector (planner states 3584 -> 4096 -> 4096), which diffusers'
Wan does not have: 0.002% of a 14B step at 480p, but up to half of a step at a shrunken ``--dim``;
the table prints its share for each size.
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers import WanTransformer3DModel  # noqa: E402
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402

from bindweave_core import constants as C  # noqa: E402
from bindweave_core.checkpoints.materialize import target_dtype  # noqa: E402
from bindweave_core.config import PRESETS, DiTConfig  # noqa: E402
from bindweave_core.dit.attention import resolve_backend  # noqa: E402
from bindweave_core.dit.compile import compile_blocks  # noqa: E402
from bindweave_core.dit.offload import enable_block_offload  # noqa: E402
from bindweave_core.dit.transformer import BindWeaveTransformer  # noqa: E402
from bindweave_core.dtypes import torch_dtype  # noqa: E402
from bindweave_core.fp8 import (  # noqa: E402
    FP8Linear,
    convert_to_fp8,
    fp8_candidate_modules,
    set_fp8_matmul,
    swap_in_fp8_linears,
)
from bindweave_core.memory import GiB, RunShape, estimate_vram, token_count  # noqa: E402

RESOLUTIONS = {"480p": (832, 480), "720p": (1280, 720)}
DTYPES = {name: torch_dtype(name) for name in C.DTYPE_NAMES}
FORMATS = (*C.DTYPE_NAMES, *(f for f in C.DIT_WEIGHT_FORMATS if f != "default"))  # a dtype or an fp8 storage
DIFFUSERS_BACKEND = {"sdpa": "native", "sage": "sage", "flash": "flash"}


# ---------------------------------------------------------------------------------- models
def config_from(args) -> DiTConfig:
    cfg = PRESETS[args.preset]
    if args.layers:
        cfg = cfg.replace(num_layers=args.layers)
    if args.dim or args.head_dim:
        dim, head_dim = args.dim or cfg.dim, args.head_dim or cfg.head_dim
        if dim % head_dim:
            raise SystemExit(f"--dim {dim} must be a multiple of the head dim {head_dim}")
        ffn = int(round(dim * cfg.ffn_dim / cfg.dim / 16)) * 16
        cfg = cfg.replace(num_heads=dim // head_dim, head_dim=head_dim, ffn_dim=ffn)
    return cfg


def _assign(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if leaf in module._parameters:
        module._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[leaf] = tensor


@torch.no_grad()
def random_dit(cfg: DiTConfig, dtype: torch.dtype, device: torch.device, seed: int = 0) -> BindWeaveTransformer:
    """Our DiT with random weights, filled tensor by tensor on ``device`` (never a full fp32 copy)."""
    with torch.device("meta"):
        model = BindWeaveTransformer(cfg)
    keep = tuple(BindWeaveTransformer._keep_in_fp32_modules)
    torch.manual_seed(seed)
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        t = torch.empty(p.shape, dtype=target_dtype(name, p.dtype, dtype, keep), device=device)
        if name.endswith("bias"):
            t.zero_()
        elif "norm" in name:
            t.fill_(1.0)
        else:  # 1/sqrt(fan-in) keeps activations O(1) through 40 blocks (no inf/denormal slow paths)
            t.normal_(0.0, 1.0 / math.sqrt(p.shape[1] if p.ndim > 1 else p.shape[-1]))
        _assign(model, name, t)
    return model.eval().requires_grad_(False)


def diffusers_twin(ours: BindWeaveTransformer, backend: str) -> WanTransformer3DModel:
    """diffusers' Wan transformer holding our very tensors (fp8 layers swapped in the same way)."""
    with torch.device("meta"):
        theirs = WanTransformer3DModel(**ours.dit_config.diffusers_kwargs())
    fp8 = [n for n, m in ours.named_modules() if isinstance(m, FP8Linear)]
    swap_in_fp8_linears(theirs, fp8)
    theirs.load_state_dict(ours.state_dict(), strict=False, assign=True)
    device = ours.patch_embedding.weight.device
    cfg = ours.dit_config  # its rotary tables are non-persistent buffers: build them for real
    theirs.rope = WanRotaryPosEmbed(cfg.head_dim, tuple(cfg.patch_size), C.ROPE_POSITIONS).to(device)
    for name in fp8:
        theirs.get_submodule(name).matmul = ours.get_submodule(name).matmul
    theirs.set_attention_backend(DIFFUSERS_BACKEND[backend])
    return theirs.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------- inputs
def make_inputs(cfg: DiTConfig, width: int, height: int, frames: int, batch: int, planner_tokens: int,
                dtype: torch.dtype, device: torch.device):
    g = torch.Generator(device="cpu").manual_seed(0)
    t, h, w = C.latent_frames(frames), height // 8, width // 8

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    x = rnd(batch, 16, t, h, w)
    cond = rnd(batch, 20, C.NUM_REF_SLOTS + t, h, w)
    t5 = rnd(batch, C.TEXT_LEN, cfg.text_dim)
    clip = rnd(batch, C.CLIP_CONTEXT_TOKENS, cfg.image_dim)
    planner = rnd(batch, planner_tokens, cfg.planner_dim)
    ts = torch.full((batch,), 500.0, device=device)
    ours = dict(args=(x, ts, t5, clip), kwargs=dict(planner_states=planner, condition=cond))
    # diffusers: the same tokens (slots as zero frames, planner tokens as extra text tokens)
    x_padded = torch.cat([x.new_zeros(batch, 16, C.NUM_REF_SLOTS, h, w), x], dim=2)
    text = torch.cat([rnd(batch, planner_tokens, cfg.text_dim), t5], dim=1)
    theirs = dict(args=(torch.cat([x_padded, cond], dim=1), ts, text, clip), kwargs=dict(return_dict=False))
    return ours, theirs


def step_flops(cfg: DiTConfig, tokens: int, context: int, items: int) -> float:
    """Multiply-adds x 2 of one step's DiT calls (linear layers + attention)."""
    d, f = cfg.dim, cfg.ffn_dim
    per_block = (4 * 2 * tokens * d * d + 2 * 2 * tokens * tokens * d  # self-attention
                 + 2 * 2 * tokens * d * d + 2 * 2 * context * d * d + 2 * 2 * tokens * context * d  # cross
                 + 2 * 2 * tokens * d * f)  # FFN
    return per_block * cfg.num_layers * items


def connector_flops(cfg: DiTConfig, planner_tokens: int, items: int) -> float:
    """The BindWeave connector's share of a step (planner_dim -> text_dim -> text_dim): work our DiT does
    and diffusers' Wan does not, so it is in the ratio. Negligible at 14B; dominant at a shrunken --dim."""
    if not cfg.planner_dim:
        return 0.0
    return 2 * planner_tokens * (cfg.planner_dim * cfg.text_dim + cfg.text_dim * cfg.text_dim) * items


# ---------------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / GiB
    return float("nan")


@torch.no_grad()
def time_steps(model, inputs: dict, calls: int, steps: int, warmup: int, device: torch.device):
    """Mean seconds per step (``calls`` DiT calls each) and peak memory (GiB) over the timed steps;
    ``(nan, nan)`` when it runs out of memory."""
    try:
        return _time_steps(model, inputs, calls, steps, warmup, device)
    except torch.OutOfMemoryError:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print("  (out of memory)", flush=True)
        return float("nan"), float("nan")


def _time_steps(model, inputs: dict, calls: int, steps: int, warmup: int, device: torch.device):
    def step():
        for _ in range(calls):
            out = model(*inputs["args"], **inputs["kwargs"])
        return out

    for _ in range(warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else peak_rss_gib()
    return sum(times) / len(times), peak


# ---------------------------------------------------------------------------------- the runs
class Models:
    """Builds our DiT once per weight family and converts it in place between formats."""

    def __init__(self, cfg: DiTConfig, device: torch.device, fp8_compute: torch.dtype):
        # ``device`` is where the weights are built: the CPU under --vram-limit / --offload, so the cap and
        # the offload apply before any block reaches the GPU (then each run places the model itself)
        self.cfg, self.device, self.fp8_compute = cfg, device, fp8_compute
        self.model: BindWeaveTransformer | None = None
        self.state: tuple | None = None

    def get(self, fmt: str) -> BindWeaveTransformer:
        if fmt in DTYPES:
            want = ("default", DTYPES[fmt])
        else:
            want = ("fp8", self.fp8_compute)
        if self.state is None or self.state[1] != want[1] or (self.state[0] == "fp8" and want[0] == "default"):
            self.model = None
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.model = random_dit(self.cfg, want[1], self.device)
            self.state = ("default", want[1])
        if want[0] == "fp8" and self.state[0] == "default":
            convert_to_fp8(self.model, fp8_candidate_modules(self.model))
            self.state = want
        if want[0] == "fp8":
            set_fp8_matmul(self.model, "scaled_mm" if fmt == "fp8_fast" else "upcast")
        return self.model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="bindweave-14b", choices=sorted(PRESETS))
    ap.add_argument("--layers", type=int, help="override the number of blocks")
    ap.add_argument("--dim", type=int, help="override the width (heads = dim / head dim, FFN scaled alike)")
    ap.add_argument("--head-dim", type=int, help="override the head dim (the 14B model's is 128)")
    ap.add_argument("--resolution", nargs="+", default=["480p"], help="480p, 720p or WxH")
    ap.add_argument("--frames", type=int, default=C.DEFAULT_FRAMES)
    ap.add_argument("--steps", type=int, default=3, help="timed steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--backends", nargs="+", default=["sdpa"], choices=["sdpa", "sage", "flash", "auto"])
    ap.add_argument("--formats", nargs="+", default=["bf16"], choices=FORMATS)
    ap.add_argument("--fp8-compute", choices=sorted(DTYPES), default="bf16", help="activation dtype of fp8 formats")
    ap.add_argument("--cfg", choices=("batched", "separate", "none"), default="batched")
    ap.add_argument("--planner-tokens", type=int, default=600)
    ap.add_argument("--offload", type=int, metavar="K", help="block offload: K resident blocks")
    ap.add_argument("--prefetch", type=int, default=1)
    ap.add_argument("--compile", action="store_true", help="regional torch.compile (ours and diffusers')")
    ap.add_argument("--compile-backend", default="inductor")
    ap.add_argument("--no-diffusers", action="store_true", help="skip the diffusers comparison")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--vram-limit", type=float, metavar="GIB",
                    help="cap this process's CUDA memory (e.g. 24 to check the 24 GB settings on a bigger GPU)")
    ap.add_argument("--estimate-only", action="store_true", help="print the memory estimator's table and exit")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    diffusers_logging.set_verbosity_error()  # one "experimental attention backends" warning per twin otherwise
    cfg = config_from(args)
    device = torch.device(args.device)
    sizes = [RESOLUTIONS.get(r) or tuple(int(v) for v in r.lower().split("x")) for r in args.resolution]
    batch, calls = {"batched": (2, 1), "separate": (1, 2), "none": (1, 1)}[args.cfg]

    if args.estimate_only:
        print(f"estimated peak GiB of the DiT stage ({cfg.num_layers} blocks, dim {cfg.dim}, {args.frames} frames, "
              f"cfg {args.cfg}):")
        for w, h in sizes:
            for fmt in args.formats:
                dtype = DTYPES.get(fmt, DTYPES[args.fp8_compute])
                wf = "default" if fmt in DTYPES else fmt
                for k in ([None] if args.offload is None else [None, args.offload]):
                    est = estimate_vram(cfg, RunShape(w, h, args.frames, batch=batch, dtype=dtype, weight_format=wf,
                                                      resident_blocks=k, prefetch_blocks=args.prefetch))
                    print(f"  {w}x{h} {fmt:<8} offload {'-' if k is None else k:>2}: {est.describe()}")
        return

    if args.vram_limit and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.vram_limit * GiB / total), device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} threads"
    print(f"device: {name}; torch {torch.__version__}; DiT {cfg.num_layers} blocks, dim {cfg.dim}, "
          f"{cfg.num_heads} heads, ffn {cfg.ffn_dim}; {args.frames} frames + {C.NUM_REF_SLOTS} slots; "
          f"cfg {args.cfg}; {args.steps} timed steps after {args.warmup} warm-up"
          + (f"; block offload {args.offload} resident" if args.offload is not None else "")
          + ("; compiled blocks" if args.compile else "")
          + (f"; memory capped at {args.vram_limit} GiB" if args.vram_limit and device.type == "cuda" else ""))
    mem_label = "peak GiB" if device.type == "cuda" else "peak RSS GiB (process, cumulative)"
    header = (f"{'size':>9} {'tokens':>7} {'format':>8} {'attn':>5} {'ours s/step':>11} {'diffusers':>9} "
              f"{'ratio':>6} {mem_label:>10} {'est. GiB':>8} {'TFLOP/s':>8}")
    print(header)
    build_device = torch.device("cpu") if device.type == "cuda" and (args.vram_limit or args.offload is not None) \
        else device
    models = Models(cfg, build_device, DTYPES[args.fp8_compute])
    for w, h in sizes:
        tokens = token_count(w, h, args.frames)
        context = C.CLIP_CONTEXT_TOKENS + args.planner_tokens + C.TEXT_LEN
        flops = step_flops(cfg, tokens, context, batch * calls)
        extra = connector_flops(cfg, args.planner_tokens, batch * calls)
        if extra:
            print(f"  ({w}x{h}: the connector, which diffusers' Wan lacks, is {extra / 1e9:.1f} GFLOP per step, "
                  f"{100 * extra / (flops + extra):.2f}% of ours)")
        for fmt in args.formats:
            ours = models.get(fmt)
            dtype = ours.patch_embedding.weight.dtype
            offload = None
            try:
                if args.offload is not None:
                    offload = enable_block_offload(ours, args.offload, device, prefetch_blocks=args.prefetch)
                    streamed = max(offload.streamed_bytes(), 1)
                    print(f"  offload: host buffers {offload.host_bytes() / GiB:.3f} GiB (page-locked "
                          f"{offload.pinned_bytes() / GiB:.3f} GiB) for {streamed / GiB:.3f} GiB of streamed tensors: "
                          f"pinned / streamed {offload.pinned_bytes() / streamed:.3f}, "
                          f"host / streamed {offload.host_bytes() / streamed:.3f}", flush=True)
                else:
                    ours.to(device)
            except torch.OutOfMemoryError:
                print(f"  {w}x{h} {fmt}: the weights do not fit on {device} (out of memory while placing them)")
                ours.to(build_device)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            if args.compile:
                compile_blocks(ours, backend=args.compile_backend)
            inputs_ours, inputs_theirs = make_inputs(cfg, w, h, args.frames, batch, args.planner_tokens, dtype,
                                                     device)
            for backend in args.backends:
                ours.set_attention_backend(backend)
                resolved = resolve_backend(backend, device.type, dtype, cfg.head_dim)
                t_ours, peak = time_steps(ours, inputs_ours, calls, args.steps, args.warmup, device)
                t_theirs = float("nan")
                if not args.no_diffusers:
                    theirs = diffusers_twin(ours, resolved)
                    if offload is not None:
                        enable_block_offload(theirs, args.offload, device, prefetch_blocks=args.prefetch)
                    if args.compile:
                        theirs.compile_repeated_blocks(backend=args.compile_backend)
                    t_theirs, _ = time_steps(theirs, inputs_theirs, calls, args.steps, args.warmup, device)
                    del theirs
                    gc.collect()
                est = estimate_vram(cfg, RunShape(w, h, args.frames, batch=batch, dtype=dtype,
                                                  weight_format="default" if fmt in DTYPES else fmt,
                                                  resident_blocks=args.offload, prefetch_blocks=args.prefetch))
                print(f"{w:>4}x{h:<4} {tokens:>7,} {fmt:>8} {resolved:>5} {t_ours:>11.3f} {t_theirs:>9.3f} "
                      f"{t_ours / t_theirs:>6.3f} {peak:>10.2f} {est.total / GiB:>8.1f} {flops / t_ours / 1e12:>8.2f}",
                      flush=True)
            if offload is not None:
                offload.remove()


if __name__ == "__main__":
    main()

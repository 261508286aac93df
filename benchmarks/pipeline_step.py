"""Seconds per denoising step of our DiT vs diffusers' WanTransformer3DModel, same weights, one process.

Configs: ``tiny`` (the smoke model's DiT) and ``small`` (4 layers, dim 512, 21+4 latent frames of
30x52 = 9,750 tokens). Both models get the plain Wan-I2V inputs (257 CLIP + 512 text tokens, the
same 25-frame token grid), so they do the same arithmetic; the ratio says what our wrapper costs.
Also prints the step time of the full BindWeave call (4 slots + 1028 CLIP + planner tokens) and the
process's peak RSS. Target: ratio <= 1.05.

    python benchmarks/pipeline_step.py [--configs tiny small] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers import WanTransformer3DModel  # noqa: E402

from bindweave_core.config import PRESETS  # noqa: E402
from bindweave_core.dit import build_dit  # noqa: E402

CONFIGS = {
    "tiny": (PRESETS["tiny"], (5, 6, 10)),  # 1 + 4 slots latent frames of 6x10
    "small": (PRESETS["tiny"].replace(num_layers=4, num_heads=4, head_dim=128, ffn_dim=1384, text_dim=512,
                                      freq_dim=256, image_dim=256, planner_dim=512), (25, 30, 52)),
}


def peak_rss_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1e6
    return float("nan")


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (allocator, caches)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench(name: str, repeats: int) -> None:
    cfg, (frames, h, w) = CONFIGS[name]
    ours = build_dit(cfg)
    theirs = WanTransformer3DModel(**cfg.diffusers_kwargs()).eval()
    missing, unexpected = theirs.load_state_dict(ours.state_dict(), strict=False)
    assert not missing and set(unexpected) <= {k for k in ours.state_dict() if "text_projector" in k}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, frames, h, w, generator=g)
    cond = torch.randn(1, 20, frames, h, w, generator=g)
    t5 = torch.randn(1, 512, cfg.text_dim, generator=g)
    clip = torch.randn(1, 257, cfg.image_dim, generator=g)
    t = torch.tensor([500.0])
    with torch.no_grad():
        t_ours = timed(lambda: ours(x, t, t5, clip, condition=cond), repeats)
        t_theirs = timed(lambda: theirs(torch.cat([x, cond], 1), t, t5, clip, return_dict=False), repeats)
        video = x[:, :, 4:]
        full = timed(lambda: ours(video, t, t5, torch.randn(1, 1028, cfg.image_dim),
                                  planner_states=torch.randn(1, 300, cfg.planner_dim), condition=cond), repeats)
    tokens = frames * (h // 2) * (w // 2)
    print(f"{name:<6} {cfg.num_layers} layers, dim {cfg.dim}, {tokens:,} tokens: ours {t_ours:.3f} s/step, "
          f"diffusers {t_theirs:.3f} s/step, ratio {t_ours / t_theirs:.3f}; full BindWeave call "
          f"(slots + 1028 CLIP + 300 planner tokens) {full:.3f} s/step; peak RSS {peak_rss_gb():.2f} GB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=["tiny", "small"], choices=sorted(CONFIGS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, best of {args.repeats} after a warm-up, one "
          "DiT forward = one step of a guidance-1 sampler")
    for name in args.configs:
        bench(name, args.repeats)


if __name__ == "__main__":
    main()

"""How long ``evaluate`` takes on the CPU: 81 frames at 832 x 480, one reference.

1. The whole evaluation with the smoke (tiny) CLIP, as ``python -m bindweave_core evaluate --smoke`` runs it
   after decoding (32 sampled frames; flickering over all 80 pairs; motion on the 31 pairs ending at a sampled
   frame): total and per part (CLIP features, flickering, motion). Target: under 30 s on 2 cores.
2. The CLIP features alone with a tower of the real CLIP ViT-H/14 size (32 layers, width 1280; random weights,
   fp32, so no download): the 32 sampled frames + 1 reference, the part that grows with the real model.
   ``--skip-vith`` leaves it out (it needs ~2.5 GB of RAM).

    python benchmarks/evaluate_speed.py [--threads 2] [--skip-vith] [--flow torch-lucas-kanade|farneback]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bindweave_core.encoders.clip_vision import CLIP_VIT_H_CONFIG, ClipVisionEncoder, build_model  # noqa: E402
from bindweave_core.evaluate import features, flow, temporal  # noqa: E402
from bindweave_core.evaluate.report import EvaluationOptions, evaluate_video, sample_indices  # noqa: E402

FRAMES, HEIGHT, WIDTH = 81, 480, 832


def synthetic_video(seed: int = 0) -> np.ndarray:
    """A smooth picture panning 3 px per frame, with a little noise: textured, moving, not random noise."""
    g = torch.Generator().manual_seed(seed)
    wide = torch.nn.functional.interpolate(torch.rand(1, 3, 12, 40, generator=g), size=(HEIGHT, WIDTH + 3 * FRAMES),
                                           mode="bicubic", align_corners=False)[0].permute(1, 2, 0)
    video = torch.stack([wide[:, 3 * t:3 * t + WIDTH] for t in range(FRAMES)])
    video = video + 0.02 * torch.randn(video.shape, generator=g)
    return (video.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def timed(label: str, fn):
    start = time.perf_counter()
    out = fn()
    print(f"  {label:<44} {time.perf_counter() - start:7.2f} s")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-vith", action="store_true")
    parser.add_argument("--flow", choices=sorted(flow.METHODS), default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    video = synthetic_video()
    ref = video[0, 100:400, 300:500]
    idx = sample_indices(FRAMES, 32)
    sampled = torch.from_numpy(video[idx])
    print(f"{FRAMES} frames {WIDTH}x{HEIGHT}, {len(idx)} sampled, {args.threads} threads, torch {torch.__version__}, "
          f"flow {args.flow or flow.default_method()}")
    tiny = ClipVisionEncoder.tiny(0)
    print("smoke CLIP, by part:")
    timed("CLIP features (32 frames + reference)", lambda: features.clip_features(tiny, sampled))
    timed("temporal flickering (80 pairs)", lambda: temporal.frame_pair_mae(video))
    timed(f"motion amplitude ({len(idx) - 1} pairs)", lambda: flow.motion_per_pair(video, idx, args.flow))
    report = timed("whole evaluate_video (smoke CLIP)", lambda: evaluate_video(
        video, [ref], tiny, EvaluationOptions(flow_method=args.flow)))
    print(f"  (report's own timer: {report['seconds']:.2f} s; motion {report['metrics']['motion_amplitude']['overall']:.2f} "
          "px/frame for a 3 px/frame pan)")
    if not args.skip_vith:
        model = build_model(CLIP_VIT_H_CONFIG, device="cpu").eval().requires_grad_(False)
        vith = ClipVisionEncoder(model, source="random ViT-H/14 size")
        print("CLIP ViT-H/14 size (fp32, random weights):")
        timed("CLIP features (32 frames + reference)",
              lambda: (features.clip_features(vith, sampled), features.clip_features(vith, torch.from_numpy(ref)[None])))


if __name__ == "__main__":
    main()

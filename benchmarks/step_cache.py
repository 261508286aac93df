"""What the caches save, same seed, one process: step caching (EasyCache) and the condition cache.

1. Step cache: the smoke pipeline with a medium CPU DiT (4 layers, 4 heads x 32, ffn 512) at 160x96,
   21 frames, the official sampler (UniPC, 50 steps, shift 3, guidance 5, batched guidance), for the
   thresholds 0 (off), the published default (0.05) and twice it. Prints the DiT forward passes and branch
   evaluations counted by a hook on the DiT (independent of the cache's own counters), the sampling wall
   time, its ratio to threshold 0, and the latent difference to threshold 0. Random weights say nothing
   about quality: the difference only shows that the cache is exact at 0 and approximate above. Random
   weights also change their output far faster than trained ones (the rule's per-step estimate is about
   0.1-0.2 here), so the published threshold may skip nothing; ``--extra`` adds a larger threshold only to
   show the mechanism (never a recommendation).
2. Reference Encode: what the node does (a new pipeline over the same loaded models each run) at 192x144,
   33 frames with the smoke models, the first run (fresh) vs the second (cached): time ratio (target >= 10)
   and whether the outputs are identical.

    python benchmarks/step_cache.py [--threads 2] [--steps 50] [--skip-sampling]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bindweave_core import constants as C  # noqa: E402
from bindweave_core.condition_cache import ConditionCache, shared_cache  # noqa: E402
from bindweave_core.config import PRESETS  # noqa: E402
from bindweave_core.dit.transformer import build_dit  # noqa: E402
from bindweave_core.pipeline import BindWeavePipeline, GenerationSettings  # noqa: E402
from bindweave_core.references import load_image  # noqa: E402
from bindweave_core.smoke import smoke_components  # noqa: E402

EXAMPLE = REPO / "examples/singleface_1/man.png"
MEDIUM = PRESETS["tiny"].replace(num_layers=4, num_heads=4, head_dim=32, ffn_dim=512)


class Evaluations:
    """Counts DiT forward passes and the branch evaluations in them (batch size of each pass)."""

    def __init__(self, dit: torch.nn.Module):
        self.calls = 0
        self.branches = 0
        self.handle = dit.register_forward_hook(self._count)

    def _count(self, module, args, out):
        self.calls += 1
        self.branches += int(out.shape[0])

    def reset(self):
        self.calls = self.branches = 0


def step_cache_table(steps: int, extra: list[float]) -> None:
    components = smoke_components(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        components["dit"] = build_dit(MEDIUM)
    pipe = BindWeavePipeline(**components, device="cpu", condition_cache=ConditionCache())
    counter = Evaluations(components["dit"])
    image = load_image(EXAMPLE)
    base = dict(prompt="a man waves at the camera", width=160, height=96, num_frames=21, steps=steps, seed=1,
                cfg_batch="batched")
    pipe.generate([image], GenerationSettings(**base, step_cache=0.0))  # warm-up; fills the condition cache
    rows, reference = [], None
    for threshold in (0.0, C.DEFAULT_STEP_CACHE, 2 * C.DEFAULT_STEP_CACHE, *extra):
        counter.reset()
        result = pipe.generate([image], GenerationSettings(**base, step_cache=threshold))
        latents = result.latents
        if reference is None:
            reference = (latents, result.timings["sampling_s"])
        diff = (latents - reference[0]).abs().max().item()
        rel = ((latents - reference[0]).norm() / reference[0].norm()).item()
        rows.append((threshold, counter.calls, counter.branches, result.timings["sampling_s"],
                     result.timings["sampling_s"] / reference[1], diff, rel, result.step_cache))
    print(f"\nStep cache: medium DiT ({MEDIUM.num_layers} layers, dim {MEDIUM.num_heads * MEDIUM.head_dim}), "
          f"{base['width']}x{base['height']}x{base['num_frames']}, UniPC {steps} steps, guidance 5, batched")
    print(f"{'threshold':>9} {'DiT passes':>10} {'branch evals':>12} {'sampling s':>10} {'time ratio':>10} "
          f"{'max |dlatent|':>13} {'rel L2':>9}")
    for threshold, calls, branches, seconds, ratio, diff, rel, _ in rows:
        print(f"{threshold:>9.3g} {calls:>10} {branches:>12} {seconds:>10.2f} {ratio:>10.2f} {diff:>13.3g} {rel:>9.3g}")
    for threshold, *_, stats in rows[1:]:
        print(f"  threshold {threshold:g}: cache's own report {stats}")


def reference_encode_table() -> None:
    components = smoke_components(0)
    settings = GenerationSettings(prompt="(references)", width=192, height=144, num_frames=33)
    image = load_image(EXAMPLE)
    shared_cache().clear()

    def node_run():  # ReferenceEncode: a new pipeline over the loaded VAE and CLIP, the shared cache
        pipe = BindWeavePipeline(dit=None, vae=components["vae"], text_encoder=None,
                                 clip_vision=components["clip_vision"], device="cpu", offload="none")
        t0 = time.perf_counter()
        refs = pipe.encode_references([image], settings, family="bindweave")
        return refs, time.perf_counter() - t0

    fresh, t_fresh = node_run()
    cached, t_cached = node_run()
    same = all(torch.equal(a, b) for a, b in ((fresh.clip_tokens, cached.clip_tokens), (fresh.slots, cached.slots),
                                               (fresh.video_condition, cached.video_condition),
                                               (fresh.canvases, cached.canvases), (fresh.masks, cached.masks)))
    print(f"\nReference Encode (smoke models, {settings.width}x{settings.height}x{settings.num_frames}): "
          f"fresh {t_fresh:.3f} s, cached {t_cached:.4f} s, ratio {t_fresh / t_cached:.0f}x, outputs identical: {same}")
    vae = components["vae"]
    cache = ConditionCache()
    t0 = time.perf_counter()
    first = vae.video_condition(settings.num_frames, settings.height, settings.width, cache=cache)
    t1 = time.perf_counter()
    again = vae.video_condition(settings.num_frames, settings.height, settings.width, cache=cache)
    t2 = time.perf_counter()
    print(f"video condition alone: fresh {t1 - t0:.3f} s, cached {t2 - t1:.4f} s, ratio {(t1 - t0) / (t2 - t1):.0f}x, "
          f"identical: {torch.equal(first, again)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=C.DEFAULT_STEPS)
    ap.add_argument("--skip-sampling", action="store_true", help="only the Reference Encode part")
    ap.add_argument("--extra", type=float, nargs="*", default=[0.5],
                    help="more thresholds, to show the mechanism on random weights (default 0.5)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    reference_encode_table()
    if not args.skip_sampling:
        step_cache_table(args.steps, args.extra)


if __name__ == "__main__":
    main()

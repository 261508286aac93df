"""The memory estimate's activation + conditioning terms against the measured peak, on the CPU.

Measured: the peak of live tensor bytes that a DiT forward allocates (weights and inputs excluded),
counted by a ``TorchDispatchMode`` that sees every op's outputs and frees them when their last tensor
dies (storage-level, so views are not counted twice). Estimated: ``estimate_vram(...).activations`` plus
the context and rotary parts of its conditioning term for the same shape (``bindweave_core.memory``;
the weights and the fixed CUDA workspace
are left out of both; of the conditioning term only what the forward makes is counted: the embedded
context and the rotary tables). Three configurations at the 14B model's proportions (head dim 128, FFN 2.7 x
dim) and real token counts for their sizes; target: within 15%.

    python benchmarks/memory_estimate.py
"""

from __future__ import annotations

import sys
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dit_speed as S  # noqa: E402

from bindweave_core import constants as C  # noqa: E402
from bindweave_core.config import PRESETS  # noqa: E402
from bindweave_core.memory import RunShape, estimate_vram, token_count  # noqa: E402


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages that ops created and that are still referenced; ``peak`` is their maximum."""

    def __init__(self):
        super().__init__()
        self.refs: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.live = self.peak = 0

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            del self.refs[key]
            self.live -= self.sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key == 0:
                    continue
                if key not in self.refs:
                    self.refs[key] = 0
                    self.sizes[key] = storage.nbytes()
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                self.refs[key] += 1
                weakref.finalize(t, self._release, key)
        return out


CONFIGS = [  # (heads at head dim 128, blocks, width x height, frames, batch)
    (4, 2, (416, 240), 17, 1),
    (8, 2, (416, 240), 9, 2),
    (4, 3, (640, 368), 9, 1),
]


def main() -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    base = PRESETS["bindweave-14b"]
    print(f"{'dim':>5} {'blocks':>6} {'size':>9} {'frames':>6} {'batch':>5} {'tokens':>6} {'measured MiB':>12} "
          f"{'estimate MiB':>12} {'est/meas':>8}")
    worst = 0.0
    for heads, layers, (w, h), frames, batch in CONFIGS:
        dim = heads * 128
        ffn = int(round(dim * base.ffn_dim / base.dim / 16)) * 16
        cfg = base.replace(num_layers=layers, num_heads=heads, ffn_dim=ffn)
        model = S.random_dit(cfg, torch.bfloat16, torch.device("cpu"))
        inputs, _ = S.make_inputs(cfg, w, h, frames, batch, 600, torch.bfloat16, torch.device("cpu"))
        counter = LiveBytes()
        with torch.no_grad(), counter:
            out = model(*inputs["args"], **inputs["kwargs"])
        del out
        est = estimate_vram(cfg, RunShape(w, h, frames, batch=batch, dtype=torch.bfloat16, planner_tokens=600))
        # what the forward itself allocates: one block's activations (the estimate's term), the embedded
        # context of each item and the rotary tables (both parts of the estimate's conditioning term)
        tokens = token_count(w, h, frames)
        context = batch * (C.CLIP_CONTEXT_TOKENS + 600 + C.TEXT_LEN) * cfg.dim * 2
        estimate = est.activations + context + tokens * cfg.head_dim // 2 * 16
        ratio = estimate / counter.peak
        worst = max(worst, abs(ratio - 1))
        print(f"{dim:>5} {layers:>6} {w:>4}x{h:<4} {frames:>6} {batch:>5} {token_count(w, h, frames):>6} "
              f"{counter.peak / 2**20:>12.1f} {estimate / 2**20:>12.1f} {ratio:>8.3f}", flush=True)
    print(f"largest deviation of the estimate from the measured peak: {100 * worst:.1f}% (target <= 15%)")


if __name__ == "__main__":
    main()

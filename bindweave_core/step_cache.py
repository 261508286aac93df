"""Runtime-adaptive step caching (EasyCache): skip a DiT evaluation while the output barely changes.

The rule, as in the authors' Wan 2.1 code (H-EmbodVis/EasyCache, ``EasyCache4Wan2.1/easycache_generate.py``,
``easycache_forward``, commit 51278044), with ``x`` the latents going in and ``v`` the DiT's output:

* the *transformation* of a computed step is ``v - x``; a skipped step returns ``x + (v - x)`` of the
  last computed step (per guidance branch: the positive and the negative prompt each keep their own);
* at every computed step the *transformation rate* ``k = mean|v - v_prev| / mean|x - x_prev|`` is
  measured between this and the previous computed step (positive branch);
* at a step after the warm-up, the relative output change is estimated without running the DiT as
  ``k * mean|x - x_last_step| / mean|v_last_computed|`` and accumulated; while the sum stays under the
  threshold the step is skipped, otherwise it is computed and the sum restarts at 0;
* the decision is taken once per step (on the positive branch) and the negative branch follows it;
* the first 20% of the steps (10 of 50 in the authors' script: ``ret_steps = 10 * 2`` calls) and the
  last step are always computed.

Calibration-free: nothing is measured offline. The threshold 0 never skips (the sum is never below 0),
and the outputs are then the DiT's own, bit for bit. The authors' published threshold for Wan 2.1 is
:data:`bindweave_core.constants.DEFAULT_STEP_CACHE` (0.05).

The wrapper sits around ``GuidanceInputs.predict``; a call with ``"cond"`` or ``"both"`` starts a new
step (``sampling.guided_velocity`` always asks for the positive branch first).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from .setting_bounds import check_setting

if TYPE_CHECKING:
    from .sampling import GuidanceInputs

log = logging.getLogger("BindWeave")

WARMUP_FRACTION = 0.2  # the authors compute the first 10 of 50 steps (ret_steps) unconditionally


def warmup_steps(total: int) -> int:
    """Steps always computed at the start: 10 of 50, as in the authors' script."""
    return math.ceil(WARMUP_FRACTION * total)


@dataclass
class StepCacheStats:
    """What the cache did in one run (reported in the sidecar JSON and the log)."""

    threshold: float
    steps: int = 0
    steps_skipped: int = 0
    dit_calls: int = 0  # forward passes run (a batched positive+negative pass counts once)
    dit_calls_saved: int = 0  # forward passes not run
    branch_evaluations: int = 0  # branch evaluations run (a batched pass counts 2)
    branch_evaluations_saved: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def summary(self) -> str:
        done = self.dit_calls + self.dit_calls_saved
        return (f"step cache (threshold {self.threshold:g}): {self.steps_skipped} of {self.steps} steps reused, "
                f"{self.dit_calls_saved} of {done} DiT evaluations saved")


def _mean_abs(t: torch.Tensor) -> torch.Tensor:
    return t.float().abs().mean()


class StepCache:
    """EasyCache around a ``predict(latents, timestep, which)`` function; one instance per sampling run."""

    def __init__(self, threshold: float) -> None:
        threshold = check_setting("step_cache", threshold)  # the settings' one validator
        self.threshold = float(threshold)
        self.stats = StepCacheStats(self.threshold)
        self._total = 0
        self._step = -1
        self._skip = False
        self._accumulated = 0.0
        self._k: torch.Tensor | None = None  # transformation rate, measured at computed steps
        self._x_step: torch.Tensor | None = None  # positive-branch input of the last step (computed or not)
        self._x_computed: torch.Tensor | None = None  # ... of the last computed step
        self._v_computed: torch.Tensor | None = None  # positive-branch output of the last computed step
        self._transformation: dict[str, torch.Tensor] = {}  # branch -> v - x of its last computed step

    def attach(self, inputs: GuidanceInputs, total_steps: int) -> GuidanceInputs:
        """``inputs`` with its predictor wrapped (for a run of ``total_steps`` steps)."""
        self._total = int(total_steps)
        self.stats.steps = self._total
        predict = inputs.predict

        def cached_predict(latents: torch.Tensor, timestep: torch.Tensor, which: str) -> torch.Tensor:
            return self._predict(predict, latents, timestep, which)

        return replace(inputs, predict=cached_predict)

    # ------------------------------------------------------------------------------ the rule
    def _decide(self, x: torch.Tensor) -> bool:
        """Whether this step is skipped (called once per step, with the positive branch's input)."""
        step, previous, self._x_step = self._step, self._x_step, x.detach().clone()
        if step < warmup_steps(self._total) or step >= self._total - 1:
            self._accumulated = 0.0
            return False
        if previous is None or self._k is None or self._v_computed is None:
            return False
        estimate = float(self._k * _mean_abs(x - previous) / _mean_abs(self._v_computed))
        self._accumulated += estimate
        if self._accumulated < self.threshold and "cond" in self._transformation:
            return True
        self._accumulated = 0.0
        return False

    def _learn(self, x: torch.Tensor, v: torch.Tensor) -> None:
        """After a computed step (positive branch): update ``k`` and the last computed input/output."""
        if self._v_computed is not None and self._x_computed is not None:
            input_change = _mean_abs(x - self._x_computed)
            if float(input_change) > 0:
                self._k = _mean_abs(v - self._v_computed) / input_change
        self._x_computed = x.detach().clone()
        self._v_computed = v.detach().float().clone()

    def _predict(self, predict, latents: torch.Tensor, timestep: torch.Tensor, which: str) -> torch.Tensor:
        names = {"cond": ("cond",), "uncond": ("uncond",), "both": ("cond", "uncond")}[which]
        if names[0] == "cond":  # a new step begins
            self._step += 1
            self._skip = self._decide(latents)
        if self._skip and all(n in self._transformation for n in names):
            self.stats.dit_calls_saved += 1
            self.stats.branch_evaluations_saved += len(names)
            if names[0] == "cond":
                self.stats.steps_skipped += 1
            x = latents.float()
            return torch.cat([x + self._transformation[n] for n in names], dim=0)
        out = predict(latents, timestep, which)
        self.stats.dit_calls += 1
        self.stats.branch_evaluations += len(names)
        x = latents.float()
        for n, v in zip(names, out.chunk(len(names)) if len(names) > 1 else (out,)):
            if n == "cond":
                self._learn(latents, v)
            self._transformation[n] = v.float() - x
        return out

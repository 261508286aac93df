"""Step caching (EasyCache): threshold 0 changes nothing; on a slowly varying synthetic velocity field the
skipped steps and the reused transformations are exactly those of the rule, recomputed here by hand.

The rule is the authors' (H-EmbodVis/EasyCache, EasyCache4Wan2.1/easycache_generate.py, easycache_forward,
commit 51278044): k = mean|v - v_prev| / mean|x - x_prev| between computed steps; skip while the sum of
k * mean|x_i - x_(i-1)| / mean|v_last| stays under the threshold; a skipped step returns x + (v - x) of
the last computed step, per branch; the first 10 of 50 steps and the last step are always computed.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from bindweave_core import constants as C
from bindweave_core.errors import InputError
from bindweave_core.pipeline import GenerationSettings
from bindweave_core.sampling import GuidanceInputs, denoise, seeded_noise
from bindweave_core.step_cache import StepCache

STEPS = 20
SHAPE = (1, 4, 2, 3, 5)
GUIDANCE = 4.0
OFFSET = {"cond": 0.3, "uncond": -0.2}


def field(x: torch.Tensor, t: torch.Tensor, branch: str) -> torch.Tensor:
    """A smooth velocity: linear in x with coefficients that drift slowly with t, one offset per branch."""
    s = float(t[0]) / 1000.0
    return (-0.9 + 0.1 * s) * x + OFFSET[branch] * (1.0 + 0.2 * math.sin(3.0 * s))


class Recorder:
    """The predictor the sampler sees: records every real evaluation as (timestep, branch)."""

    def __init__(self):
        self.calls: list[tuple[float, str]] = []

    def __call__(self, x, t, which):
        names = ("cond", "uncond") if which == "both" else (which,)
        for n in names:
            self.calls.append((float(t[0]), n))
        return torch.cat([field(x, t, n) for n in names])


def run(threshold: float | None, batch_cfg: bool = True, guidance: float = GUIDANCE):
    rec = Recorder()
    inputs = GuidanceInputs(predict=rec, guidance=guidance, batch_cfg=batch_cfg)
    seen: list[torch.Tensor] = []
    cache = StepCache(threshold) if threshold is not None else None
    out = denoise(inputs, seeded_noise(SHAPE, 3), steps=STEPS, sampler="euler", shift=3.0,
                  callback=lambda i, n, lat: seen.append(lat.clone()), step_cache=cache)
    return out, rec, cache, seen


def expected(threshold: float, guidance: float = GUIDANCE) -> tuple[torch.Tensor, list[int]]:
    """The rule applied by hand, stepping diffusers' Euler scheduler ourselves; returns (latents, skipped)."""
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=C.NUM_TRAIN_TIMESTEPS, shift=3.0)
    sched.set_timesteps(STEPS)
    branches = ("cond",) if guidance == 1.0 else ("cond", "uncond")
    x = seeded_noise(SHAPE, 3)
    warmup = math.ceil(0.2 * STEPS)
    k = x_prev = x_comp = v_comp = None
    acc = 0.0
    delta: dict[str, torch.Tensor] = {}
    skipped = []
    for i, t in enumerate(sched.timesteps):
        tt = t.expand(1).float()
        skip = False
        if warmup <= i < STEPS - 1 and k is not None:
            acc += k * (x - x_prev).abs().mean().item() / v_comp.abs().mean().item()
            skip = acc < threshold
            if not skip:
                acc = 0.0
        else:
            acc = 0.0
        x_prev = x.clone()
        if skip:
            skipped.append(i)
            v = {n: x + delta[n] for n in branches}
        else:
            v = {n: field(x, tt, n) for n in branches}
            if v_comp is not None:
                k = (v["cond"] - v_comp).abs().mean().item() / (x - x_comp).abs().mean().item()
            x_comp, v_comp = x.clone(), v["cond"].clone()
            delta = {n: v[n] - x for n in branches}
        vel = v["cond"] if guidance == 1.0 else v["uncond"] + guidance * (v["cond"] - v["uncond"])
        x = sched.step(vel, t, x, return_dict=False)[0]
    return x, skipped


def test_threshold_zero_is_bit_identical_to_no_cache():
    for batch_cfg in (True, False):
        plain, rec_plain, _, _ = run(None, batch_cfg)
        zero, rec_zero, cache, _ = run(0.0, batch_cfg)
        assert torch.equal(plain, zero)
        assert rec_zero.calls == rec_plain.calls and len(rec_plain.calls) == 2 * STEPS
        assert cache.stats.steps_skipped == 0 and cache.stats.dit_calls_saved == 0


@pytest.mark.parametrize("batch_cfg", [True, False])
def test_skips_follow_the_rule_and_reuse_the_last_transformation(batch_cfg):
    threshold = 0.3
    want, skipped = expected(threshold)
    # the field is slow enough for the rule to skip some steps but not all after the warm-up
    assert 0 < len(skipped) < STEPS - math.ceil(0.2 * STEPS) - 1
    got, rec, cache, _ = run(threshold, batch_cfg)
    timesteps = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    timesteps.set_timesteps(STEPS)
    computed = [i for i in range(STEPS) if i not in skipped]
    assert rec.calls == [(float(timesteps.timesteps[i]), n) for i in computed for n in ("cond", "uncond")]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)  # reused x + (v - x) per branch, as by hand
    s = cache.stats
    assert (s.steps, s.steps_skipped) == (STEPS, len(skipped))
    assert s.branch_evaluations == 2 * len(computed) and s.branch_evaluations_saved == 2 * len(skipped)
    assert s.dit_calls == (1 if batch_cfg else 2) * len(computed)
    assert s.dit_calls_saved == (1 if batch_cfg else 2) * len(skipped)
    # warm-up and last step are never skipped
    assert not [i for i in skipped if i < math.ceil(0.2 * STEPS) or i == STEPS - 1]


def test_guidance_one_caches_the_single_branch_and_more_threshold_skips_more():
    want, skipped = expected(0.3, guidance=1.0)
    got, rec, cache, _ = run(0.3, guidance=1.0)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert {n for _, n in rec.calls} == {"cond"} and cache.stats.steps_skipped == len(skipped) > 0
    fewer = run(0.15, guidance=1.0)[2].stats.steps_skipped
    more = run(0.6, guidance=1.0)[2].stats.steps_skipped
    assert fewer <= len(skipped) <= more and fewer < more


def test_bad_thresholds_are_refused():
    with pytest.raises(InputError, match="step_cache must be a number from 0 to 1"):
        StepCache(-0.1)
    with pytest.raises(InputError, match="step_cache"):
        GenerationSettings(prompt="x", step_cache=-1.0).validate(1)
    # a bare --step-cache takes the --thresh default of EasyCache4Wan2.1/easycache_generate.py; none is off
    from bindweave_core.cli import build_parser

    base = ["generate", "--smoke", "--prompt", "x", "--ref", "a.png", "--out", "o.mp4"]
    assert build_parser().parse_args([*base, "--step-cache"]).step_cache == 0.05
    assert build_parser().parse_args(base).step_cache == 0.0 == GenerationSettings(prompt="x").step_cache


def test_few_step_preset_is_the_lightx2v_step_distill_schedule():
    """lightx2v (ModelTC/LightX2V, configs/distill/wan_i2v_distill_4step_cfg_lora.json and
    lightx2v/models/schedulers/wan/step_distill/scheduler.py): sigmas = 5u / (1 + 4u) at the
    denoising_step_list [1000, 750, 500, 250] / 1000, model timesteps 1000 * sigma, Euler steps
    x + (sigma_next - sigma) * v and a last step to sigma 0; no CFG. Read off the sampler by running it on
    a constant velocity field (so it holds whatever scheduler class implements the preset's sampler)."""
    from bindweave_core.sampling import FEW_STEP_PRESET

    seen_t, seen_x, branches = [], [], []

    def constant(x, t, which):
        seen_t.append(float(t[0]))
        branches.append(which)
        return torch.ones_like(x)

    x0 = torch.zeros(1, 1, 1, 1, 1)
    inputs = GuidanceInputs(predict=constant, guidance=FEW_STEP_PRESET["guidance"])
    denoise(inputs, x0, steps=FEW_STEP_PRESET["steps"], sampler=FEW_STEP_PRESET["sampler"],
            shift=FEW_STEP_PRESET["shift"], callback=lambda i, n, lat: seen_x.append(float(lat)))
    u = torch.tensor([1000, 750, 500, 250], dtype=torch.float64) / 1000
    sigmas = (5 * u / (1 + 4 * u)).tolist() + [0.0]
    assert seen_t == pytest.approx([1000 * s for s in sigmas[:4]], abs=1e-3)  # 4 steps, shift 5: one call each
    assert len(set(branches)) == 1  # guidance 1: the unconditional branch never runs
    # x_k = sum of (sigma_(i+1) - sigma_i) * 1 = sigma_k - sigma_0
    assert seen_x == pytest.approx([s - sigmas[0] for s in sigmas[1:]], abs=1e-6)


def test_fast_workflow_uses_the_few_step_preset():
    import json

    from helpers import REPO
    from nodes.specs import SPECS

    ui = json.loads((REPO / "workflows/bindweave_fast_few_step.json").read_text())
    node = next(n for n in ui["nodes"] if n["type"] == "BindWeaveSampler")
    values = list(node["widgets_values"])
    del values[1]  # the seed's control_after_generate
    widgets = dict(zip([w.name for w in SPECS["BindWeaveSampler"].widgets()], values))
    from bindweave_core.sampling import FEW_STEP_PRESET

    assert {k: widgets[k] for k in FEW_STEP_PRESET} == FEW_STEP_PRESET and widgets["step_cache"] == 0.0


def test_generate_command_reports_the_step_cache_in_the_sidecar(tmp_path):
    import json

    from bindweave_core import cli
    from helpers import REPO

    out = tmp_path / "cached.mp4"
    rc = cli.main(["generate", "--smoke", "--ref", str(REPO / "examples/singleface_1/man.png"), "--prompt", "a man",
                   "--out", str(out), "--width", "32", "--height", "32", "--frames", "1", "--steps", "6",
                   "--step-cache"])
    assert rc == 0
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["settings"]["step_cache"] == C.DEFAULT_STEP_CACHE
    report = sidecar["step_cache"]
    assert report["threshold"] == C.DEFAULT_STEP_CACHE and report["steps"] == 6
    assert report["dit_calls"] + report["dit_calls_saved"] == 6  # batched guidance on the CPU: one pass a step
    assert report["branch_evaluations"] + report["branch_evaluations_saved"] == 12

"""NaN/inf stops a run at the stage that made it (planner, UMT5, CLIP, first step, final latents), naming
the model and its precision; a LoRA holding NaN is refused before merging; a damaged condition-cache
entry is recomputed with one warning."""

from __future__ import annotations

import logging

import pytest
import torch

from bindweave_core.condition_cache import ConditionCache
from bindweave_core.conditioning import PlannerStates
from bindweave_core.errors import CheckpointError
from bindweave_core.finite import NonFiniteError, check_finite
from bindweave_core.pipeline import BindWeavePipeline, GenerationSettings
from helpers import REPO

EXAMPLE = REPO / "examples/singleface_1/man.png"
SMALL = dict(width=32, height=32, num_frames=5, steps=3)


def settings(**kw) -> GenerationSettings:
    return GenerationSettings(**{"prompt": "a man waves", **SMALL, **kw})


def fresh_pipe() -> BindWeavePipeline:
    return BindWeavePipeline.smoke(seed=0, condition_cache=ConditionCache())  # own cache: nothing reused


def poison(t: torch.Tensor) -> torch.Tensor:
    out = t.clone()
    out.reshape(-1)[0] = float("nan")
    return out


class DiTCalls:
    def __init__(self, dit, poison_from: int | None = None):
        self.n = 0
        self.poison_from = poison_from
        self.handle = dit.register_forward_hook(self._hook)

    def _hook(self, module, args, out):
        self.n += 1
        if self.poison_from is not None and self.n >= self.poison_from:
            return poison(out)
        return out


def test_check_finite_names_stage_model_and_precision_with_the_fix():
    good = torch.ones(3)
    assert check_finite(good, stage="x", model="m", dtype=torch.float16) is good
    bad = torch.tensor([1.0, float("nan"), float("inf"), float("-inf")])
    with pytest.raises(NonFiniteError) as e:
        check_finite(bad, stage="planner states", model="the planner (Qwen2.5-VL)", dtype=torch.float16)
    text = str(e.value)
    assert "planner states" in text and "Qwen2.5-VL" in text and "ran in fp16" in text
    assert "1 NaN, 2 inf of 4" in text and "--dtype bf16" in text
    assert "ran in bf16" in str(pytest.raises(NonFiniteError, check_finite, bad, stage="s", model="m",
                                              dtype=torch.bfloat16).value)


def test_nan_in_the_planner_output_stops_the_run_before_the_dit(monkeypatch):
    pipe = fresh_pipe()
    planner = pipe.component("planner")
    real = planner.encode
    monkeypatch.setattr(planner, "encode", lambda *a, **k: PlannerStates(poison(real(*a, **k).positive),
                                                                        real(*a, **k).negative))
    calls = DiTCalls(pipe.component("dit"))
    with pytest.raises(NonFiniteError, match=r"the planner states hold non-finite values \(1 NaN, 0 inf .*"
                                             r"the planner \(Qwen2\.5-VL\) ran in fp32"):
        pipe.generate([EXAMPLE], settings())
    assert calls.n == 0  # stopped before sampling
    assert len(pipe.condition_cache) == 0  # nothing broken was kept


def test_nan_in_umt5_and_clip_outputs_is_named():
    pipe = fresh_pipe()
    text = pipe.component("text_encoder").model
    handle = text.register_forward_hook(lambda m, a, out: type(out)(last_hidden_state=poison(out.last_hidden_state))
                                        if hasattr(out, "last_hidden_state") else poison(out))
    try:
        with pytest.raises(NonFiniteError, match=r"text encoder states .*UMT5-XXL\) ran in fp32"):
            pipe.encode_text("a man waves", "blurry")
    finally:
        handle.remove()
    clip = pipe.component("clip_vision")
    real = clip.encode_references
    clip.encode_references = lambda *a, **k: poison(real(*a, **k))
    with pytest.raises(NonFiniteError, match=r"CLIP vision tokens .*ViT-H/14\) ran in fp32"):
        pipe.encode_references([EXAMPLE], settings())


@pytest.mark.parametrize("cfg", ["batched", "separate"])
def test_nan_from_the_dit_stops_at_the_first_step(cfg):
    pipe = fresh_pipe()
    calls = DiTCalls(pipe.component("dit"), poison_from=1)
    steps_done = []
    with pytest.raises(NonFiniteError, match=r"first step's velocity \((both|cond)\) .*the DiT ran in fp32"):
        pipe.generate([EXAMPLE], settings(cfg_batch=cfg), callback=lambda i, n, x: steps_done.append(i))
    assert calls.n == 1 and steps_done == []


def test_nan_appearing_later_is_caught_in_the_final_latents():
    pipe = fresh_pipe()
    DiTCalls(pipe.component("dit"), poison_from=2)  # step 1 fine (batched: one call a step), step 2 NaN
    with pytest.raises(NonFiniteError, match=r"final latents .*the DiT ran in fp32"):
        pipe.generate([EXAMPLE], settings(cfg_batch="batched"))


def test_lora_with_nan_is_refused_naming_file_and_tensor(tmp_path):
    from safetensors.torch import save_file

    from bindweave_core.lora import load_lora

    path = tmp_path / "diverged.safetensors"
    down = torch.zeros(4, 64)
    up = torch.zeros(64, 4)
    up[3, 1] = float("inf")
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": down,
               "diffusion_model.blocks.0.self_attn.q.lora_B.weight": up}, str(path))
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match=rf"{path}: tensor diffusion_model\.blocks\.0\.self_attn\.q\.lora_B\."
                                              r"weight holds non-finite values \(0 NaN, 1 inf of 256\)"):
        load_lora(path)
    assert path.read_bytes() == before


def test_damaged_cache_entry_is_recomputed_once_with_a_warning(tmp_path, caplog):
    value = {"t": torch.arange(4096, dtype=torch.float32)}
    ConditionCache(tmp_path).get("text", {"x": 1}, lambda: value)
    (path,) = tmp_path.iterdir()
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x40  # one bit of a tensor's bytes: same size, still a valid file
    path.write_bytes(bytes(data))
    computed = []
    with caplog.at_level(logging.WARNING, logger="BindWeave"):
        out = ConditionCache(tmp_path).get("text", {"x": 1}, lambda: computed.append(1) or value)
    assert computed == [1] and torch.equal(out["t"], value["t"])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "is damaged" in warnings[0], warnings
    caplog.clear()  # rewritten: the next process reads it without a warning or a recompute
    with caplog.at_level(logging.WARNING, logger="BindWeave"):
        again = ConditionCache(tmp_path).get("text", {"x": 1}, lambda: pytest.fail("recomputed"))
    assert torch.equal(again["t"], value["t"]) and not caplog.records

"""End to end with the built-in smoke models: the generate command, seeds, call counts, cancel, inputs."""

from __future__ import annotations

import json
import re

import pytest
import torch

from bindweave_core import cli
from bindweave_core.errors import GenerationCancelled, InputError
from bindweave_core.generate_cli import generate_to_file
from bindweave_core.pipeline import BindWeavePipeline, GenerationSettings, Lazy
from bindweave_core.smoke import smoke_components
from bindweave_core.video_io import read_video
from helpers import REPO, SAMPLES, need

EXAMPLE = REPO / "examples/singleface_1/man.png"
SMALL = dict(width=64, height=48, num_frames=5, steps=3)


def settings(**kw) -> GenerationSettings:
    return GenerationSettings(**{"prompt": "a man waves at the camera", **SMALL, **kw})


@pytest.fixture(scope="module")
def pipe():
    return BindWeavePipeline.smoke(seed=0)


class DiTCalls:
    """Counts forward calls of the DiT (and the batch of each)."""

    def __init__(self, dit):
        self.batches: list[int] = []
        self.handle = dit.register_forward_hook(lambda m, args, out: self.batches.append(out.shape[0]))

    def close(self):
        self.handle.remove()


# ------------------------------------------------------------------------------------ the command
def test_generate_command_on_the_shared_singleface_case(tmp_path):
    case = json.loads(need(SAMPLES / "test_case.json").read_text())["singleface_1"]
    image = SAMPLES / "images" / case["img_paths"][0].split("/")[-1]
    out = tmp_path / "videos" / "singleface.mp4"
    rc = cli.main(["generate", "--smoke", "--ref", str(image), "--prompt", case["prompt"], "--out", str(out),
                   "--width", "96", "--height", "64", "--frames", "13", "--steps", "2", "--seed", "7"])
    assert rc == 0
    frames, fps = read_video(out)
    assert frames.shape == (13, 64, 96, 3) and fps == 16
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["settings"]["num_frames"] == 13 and sidecar["seed"] == 7
    assert sidecar["settings"]["prompt"] == case["prompt"] and sidecar["models"] == {"smoke": True}
    assert sidecar["frames_written"] == 13 and sidecar["references"] == [str(image)]
    assert sorted(p.name for p in out.parent.iterdir()) == ["singleface.json", "singleface.mp4"]


def test_generate_command_reports_bad_input(tmp_path, capsys):
    rc = cli.main(["generate", "--smoke", "--ref", str(EXAMPLE), "--prompt", "x", "--out", str(tmp_path / "o.mp4"),
                   "--frames", "10"])
    assert rc == 2
    assert "frames must be 4k+1" in capsys.readouterr().err
    assert not (tmp_path / "o.mp4").exists()


# ------------------------------------------------------------------------------------ determinism
def test_same_seed_gives_bit_identical_latents_and_other_seeds_differ():
    a = BindWeavePipeline.smoke(seed=0).generate([EXAMPLE], settings(seed=11))
    b = BindWeavePipeline.smoke(seed=0).generate([EXAMPLE], settings(seed=11))
    c = BindWeavePipeline.smoke(seed=0).generate([EXAMPLE], settings(seed=12))
    assert torch.equal(a.latents, b.latents) and torch.equal(a.frames, b.frames)
    assert (a.latents - c.latents).abs().max() > 1e-3
    assert a.frames.shape == (5, 48, 64, 3) and 0 <= a.frames.min() and a.frames.max() <= 1


def test_batched_and_separate_guidance_agree(pipe):
    """cond/uncond have planner states of different lengths; batching them must not change the result."""
    batched = pipe.generate([EXAMPLE], settings(cfg_batch="batched"))
    separate = pipe.generate([EXAMPLE], settings(cfg_batch="separate"))
    torch.testing.assert_close(batched.latents, separate.latents, rtol=0, atol=1e-5)


@pytest.mark.parametrize("guidance,cfg,expected", [(1.0, "batched", [1, 1, 1]), (5.0, "batched", [2, 2, 2]),
                                                    (5.0, "separate", [1, 1, 1, 1, 1, 1])])
def test_dit_calls_per_step(pipe, guidance, cfg, expected):
    calls = DiTCalls(pipe.component("dit"))
    try:
        pipe.generate([EXAMPLE], settings(guidance=guidance, cfg_batch=cfg))
    finally:
        calls.close()
    assert calls.batches == expected  # 3 steps: one call of batch 1, one of batch 2, or two of batch 1


# ------------------------------------------------------------------------------------ cancel
def test_cancel_leaves_no_output_and_raises(pipe, tmp_path):
    out = tmp_path / "cancelled.mp4"
    steps_seen = []

    def cancel_at_2(step, total, latents):
        steps_seen.append(step)
        return step < 2

    with pytest.raises(GenerationCancelled):
        generate_to_file(pipe, [EXAMPLE], settings(steps=5), out, callback=cancel_at_2)
    assert steps_seen == [1, 2]
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------ bad inputs
@pytest.mark.parametrize("kw,message", [
    (dict(num_frames=10), "frames must be 4k+1"),
    (dict(width=100), "width must be a multiple of 16"),
    (dict(height=50), "height must be a multiple of 16"),
    (dict(prompt="   "), "the prompt is empty"),
    (dict(sampler="ddim"), "unknown sampler"),
])
def test_bad_settings_have_clear_messages(pipe, kw, message):
    with pytest.raises(InputError, match=re.escape(message)):
        pipe.generate([EXAMPLE], settings(**kw))


def test_reference_count_and_unreadable_images(pipe, tmp_path):
    with pytest.raises(InputError, match="5 reference images given; BindWeave takes 1 to 4. Remove 1 of them"):
        pipe.generate([EXAMPLE] * 5, settings())
    with pytest.raises(InputError, match="0 reference images given"):
        pipe.generate([], settings())
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(InputError, match="broken.png"):
        pipe.generate([broken], settings())
    with pytest.raises(InputError, match="missing.png"):
        pipe.generate([tmp_path / "missing.png"], settings())


# ------------------------------------------------------------------------------------ placement
def test_release_mode_loads_each_model_when_needed_and_frees_it():
    built = smoke_components(seed=0)
    loads: dict[str, int] = {}

    def loader(name):
        def load():
            loads[name] = loads.get(name, 0) + 1
            return built[name]
        return Lazy(load, name)

    pipe = BindWeavePipeline(**{k: loader(k) for k in built}, device="cpu", offload="release")
    result = pipe.generate([EXAMPLE], settings())
    assert result.frames.shape[0] == 5
    # the VAE serves the references and the decode: loaded twice; everything else once; nothing kept
    assert loads == {"planner": 1, "text_encoder": 1, "clip_vision": 1, "vae": 2, "dit": 1}
    assert pipe._loaded == {}

    kept = BindWeavePipeline(**{k: loader(k) for k in built}, device="cpu", offload="none")
    loads.clear()
    kept.generate([EXAMPLE], settings())
    kept.generate([EXAMPLE], settings(seed=3))
    assert loads == {"planner": 1, "text_encoder": 1, "clip_vision": 1, "vae": 1, "dit": 1}


# ------------------------------------------------------------------------------------ host memory manager
@pytest.fixture
def host_memory():
    """Installs counting host hooks (as the ComfyUI nodes do) and restores PyTorch's afterwards."""
    from bindweave_core import device_memory

    calls = {"release": 0, "free": [], "order": []}

    def release():
        calls["release"] += 1

    def free_bytes(device):
        calls["free"].append(device)
        calls["order"].append("free")
        return 7 << 30

    def make_room(device, memory_required):
        calls["order"].append(("make_room", device, memory_required))

    device_memory.use_host_memory_manager(release=release, free_bytes=free_bytes, make_room=make_room)
    yield calls
    device_memory.use_host_memory_manager()


def test_host_memory_manager_answers_the_cores_questions(host_memory):
    from bindweave_core import memory
    from bindweave_core.device_memory import free_device_memory

    assert free_device_memory(torch.device("cuda", 1)) == 7 << 30
    assert free_device_memory(torch.device("cpu")) is None  # no limit the core can check off CUDA
    assert host_memory["free"] == [torch.device("cuda", 1)]
    # the batching decision asks the host too (the nodes' cfg_batch "auto")
    dit = smoke_components(seed=0)["dit"]
    host_memory["order"].clear()
    assert memory.fits_batched_cfg(dit, settings(), torch.device("cuda", 0)) is True
    assert host_memory["free"][-1] == torch.device("cuda", 0)
    # the host is asked to unload idle models first, for what batching needs, then the free memory is read
    (kind, device, need), last = host_memory["order"]
    assert (kind, device, last) == ("make_room", torch.device("cuda", 0), "free") and 0 < need < 7 << 30


def test_models_left_in_place_release_nothing_and_cancel_releases_through_the_host(pipe, host_memory):
    pipe.generate([EXAMPLE], settings())  # offload "none": nothing moved, nothing to release
    assert host_memory["release"] == 0
    with pytest.raises(GenerationCancelled):
        pipe.generate([EXAMPLE], settings(), callback=lambda step, total, latents: False)
    assert host_memory["release"] == 1

    built = smoke_components(seed=0)
    released = BindWeavePipeline(**{k: Lazy(lambda v=v: v, k) for k, v in built.items()}, device="cpu",
                                 offload="release")
    released.generate([EXAMPLE], settings())
    assert host_memory["release"] == 1 + 6  # one per dropped stage: planner, text, clip, vae, dit, vae

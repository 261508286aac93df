"""nodes/host.py against emulated ComfyUI answers, without ComfyUI installed.

The fake ``comfy.model_management`` below answers the device questions the way ComfyUI's own functions
do for three machines (a bf16 GPU, an fp16-only GPU, the CPU), and keeps a list of loaded models that
its ``free_memory`` unloads, idle ones only, until enough is free (ComfyUI's contract in 0.3.64 and
0.33.0: ``free_memory(memory_required, device, keep_loaded=[])``).
"""

from __future__ import annotations

import importlib
import logging
import sys
import types
from dataclasses import dataclass, field

import pytest
import torch

from bindweave_core import device_memory, memory
from bindweave_core.pipeline import GenerationSettings
from bindweave_core.smoke import smoke_components

GPU = torch.device("cuda", 0)
CPU = torch.device("cpu")
GiB = 1 << 30


@dataclass
class Machine:
    """What ComfyUI's model_management would say on one machine."""

    torch_device: torch.device
    text_device: torch.device
    bf16: bool
    fp16: bool
    flags: dict = field(default_factory=dict)  # ComfyUI launch flags, e.g. {"fp32_text_enc": True}


BF16_GPU = Machine(GPU, GPU, bf16=True, fp16=True)
FP16_GPU = Machine(GPU, GPU, bf16=False, fp16=True)  # e.g. a Turing card
CPU_ONLY = Machine(CPU, CPU, bf16=False, fp16=False)  # ComfyUI --cpu


class FakePatcher:
    """A ModelPatcher's identity (ComfyUI's LoadedModel holds it weakly)."""


class FakeLoaded:
    """ComfyUI's LoadedModel as free_memory sees it."""

    def __init__(self, model, device: torch.device, size: int):
        self.model, self.device, self.size = model, device, size


def fake_comfy(machine: Machine, total: int = 0):
    mm = types.ModuleType("comfy.model_management")
    mm.args = types.SimpleNamespace(**machine.flags)
    mm.get_torch_device = lambda: machine.torch_device
    mm.unet_offload_device = lambda: CPU
    mm.vae_device = lambda: machine.torch_device
    mm.vae_offload_device = lambda: CPU
    mm.text_encoder_device = lambda: machine.text_device
    mm.text_encoder_offload_device = lambda: CPU
    mm.is_device_cpu = lambda device: device.type == "cpu"
    # ComfyUI: should_use_bf16/fp16 are False for a CPU device whatever the GPU can do
    mm.should_use_bf16 = lambda device=None, **kw: machine.bf16 and device.type != "cpu"
    mm.should_use_fp16 = lambda device=None, **kw: machine.fp16 and device.type != "cpu"
    mm.current_loaded_models = []
    mm.unloaded = []

    def get_free_memory(device=None, torch_free_too=False):
        return total - sum(m.size for m in mm.current_loaded_models if m.device == device)

    def free_memory(memory_required, device, keep_loaded=()):
        for loaded in list(mm.current_loaded_models):
            if get_free_memory(device) >= memory_required:
                break
            if loaded.device == device and loaded not in keep_loaded:
                mm.current_loaded_models.remove(loaded)
                mm.unloaded.append(loaded.model)

    def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                        force_full_load=False):
        mm.loads.append(list(models))

    mm.get_free_memory, mm.free_memory, mm.load_models_gpu, mm.loads = get_free_memory, free_memory, load_models_gpu, []
    mm.soft_empty_cache = lambda force=False: None
    comfy = types.ModuleType("comfy")
    patcher = types.ModuleType("comfy.model_patcher")
    patcher.ModelPatcher = object
    utils = types.ModuleType("comfy.utils")
    comfy.model_management, comfy.model_patcher, comfy.utils = mm, patcher, utils
    folder_paths = types.ModuleType("folder_paths")
    return {"comfy": comfy, "comfy.model_management": mm, "comfy.model_patcher": patcher, "comfy.utils": utils,
            "folder_paths": folder_paths}


@pytest.fixture
def comfy_host(monkeypatch):
    """``make(machine, total_vram)`` -> nodes.host imported over a fake ComfyUI (removed afterwards)."""
    import nodes

    def forget_host():
        sys.modules.pop("nodes.host", None)
        if hasattr(nodes, "host"):
            delattr(nodes, "host")

    def make(machine: Machine, total: int = 0):
        for name, module in fake_comfy(machine, total).items():
            monkeypatch.setitem(sys.modules, name, module)
        forget_host()
        return importlib.import_module("nodes.host")

    yield make
    forget_host()
    device_memory.use_host_memory_manager()


KINDS = [("dit", "DiT"), ("planner", "planner"), ("text_encoder", "text encoder"),
         ("clip_vision", "CLIP vision encoder"), ("vae", "VAE")]


def test_auto_is_the_official_bf16_on_a_bf16_gpu(comfy_host, caplog):
    host = comfy_host(BF16_GPU)
    with caplog.at_level(logging.INFO, logger="BindWeave"):
        picked = {kind: host.torch_dtype("auto", kind, what) for kind, what in KINDS}
    assert picked == dict.fromkeys(picked, torch.bfloat16)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == len(KINDS)  # one line per choice
    assert lines[1] == "planner precision (auto): bf16, the official run's precision, supported on cuda:0"


def test_auto_falls_back_to_fp16_only_where_bf16_is_unsupported(comfy_host, caplog):
    host = comfy_host(FP16_GPU)
    with caplog.at_level(logging.INFO, logger="BindWeave"):
        picked = {kind: host.torch_dtype("auto", kind, what) for kind, what in KINDS}
    assert picked == {"dit": torch.float16, "planner": torch.float16, "text_encoder": torch.float16,
                      "clip_vision": torch.float16, "vae": torch.float32}  # VAEs never fp16, as ComfyUI's own
    assert "planner precision (auto): fp16, cuda:0 does not support bf16" in caplog.text


def test_auto_is_fp32_on_the_cpu(comfy_host):
    host = comfy_host(CPU_ONLY)
    assert {host.torch_dtype("auto", kind, what) for kind, what in KINDS} == {torch.float32}
    # a GPU machine whose text encoders ComfyUI keeps on the CPU (e.g. low VRAM): fp32 for those only
    host = comfy_host(Machine(GPU, CPU, bf16=True, fp16=True))
    assert host.torch_dtype("auto", "planner", "planner") == torch.float32
    assert host.torch_dtype("auto", "dit", "DiT") == torch.bfloat16


def test_comfyui_launch_flags_and_explicit_choices_win(comfy_host):
    host = comfy_host(Machine(GPU, GPU, bf16=True, fp16=True, flags={"fp32_text_enc": True, "fp16_unet": True}))
    assert host.torch_dtype("auto", "planner", "planner") == torch.float32
    assert host.torch_dtype("auto", "clip_vision", "CLIP") == torch.float32
    assert host.torch_dtype("auto", "dit", "DiT") == torch.float16
    assert host.torch_dtype("auto", "vae", "VAE") == torch.bfloat16  # no VAE flag given
    assert host.torch_dtype("fp16", "planner", "planner") == torch.float16  # the widget's explicit choice


def batched_need(dit, settings) -> int:
    """What batch 2 needs beyond the DiT's weights (the module docstring of bindweave_core.memory)."""
    est = memory.estimate_vram(dit.dit_config, memory.RunShape(settings.width, settings.height, settings.num_frames,
                                                              batch=2, dtype=torch.float32))
    return est.activations + est.conditioning + est.workspace


def test_cfg_batching_counts_what_comfyui_can_unload(comfy_host):
    """An idle model (e.g. the planner after encoding) fills the GPU: ComfyUI unloads it and cond/uncond run
    batched; the DiT the Sampler loaded stays. Only memory nobody can free makes the choice "separate"."""
    dit = smoke_components(seed=0)["dit"]
    settings = GenerationSettings(prompt="x", width=64, height=64, num_frames=5)
    need = batched_need(dit, settings)
    total = 2 * need
    host = comfy_host(BF16_GPU, total)
    host.use_comfy_memory_manager()
    mm = sys.modules["comfy.model_management"]
    sampler_dit, planner = FakePatcher(), FakePatcher()
    model = host.Loaded(component=dit, patcher=sampler_dit, kind="dit")
    host.load_to_device(model)
    mm.current_loaded_models[:] = [FakeLoaded(planner, GPU, total - need // 2), FakeLoaded(sampler_dit, GPU, 0)]
    assert mm.get_free_memory(GPU) < need  # what the check saw before: it chose "separate"

    assert memory.fits_batched_cfg(dit, settings, GPU) is True
    assert mm.unloaded == [planner] and [m.model for m in mm.current_loaded_models] == [sampler_dit]

    # the DiT itself holds the memory: nothing can be unloaded, batching is refused, the DiT stays loaded
    mm.current_loaded_models[:] = [FakeLoaded(sampler_dit, GPU, total - need // 2)]
    assert memory.fits_batched_cfg(dit, settings, GPU) is False
    assert mm.unloaded == [planner] and [m.model for m in mm.current_loaded_models] == [sampler_dit]

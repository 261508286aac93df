"""BindWeave as a native ComfyUI ``MODEL``: our core DiT behind ComfyUI's model classes.

* :class:`OriginalLayout` presents the DiT's modules under the original Wan parameter names (the
  names ComfyUI's own Wan model has: ``blocks.0.self_attn.q``), sharing the very same modules and
  parameters, so ComfyUI's own LoRA key mapping (``comfy.lora.model_lora_keys_unet``) finds
  original-layout, kohya and trainer LoRAs on it without any mapping of ours.
* :class:`BindWeaveDiffusionModel` is the ``diffusion_model`` ComfyUI calls: it runs ComfyUI's
  diffusion-model wrappers (step caches such as EasyCache hook in there) and then the core's
  :func:`bindweave_core.denoiser.dit_velocity`, the very call our own Sampler makes, with the branch
  tensors the conditioning carries. So the official quirks (257-token CLIP split, 4 slots, zero front
  padding and trimming, references in the negative branch) hold on the native route too.
* :class:`BindWeaveNativeModel` is a ``comfy.model_base.BaseModel``: flow model sampling
  (``ModelSamplingDiscreteFlow``, shift 3 for BindWeave, 7 for Kaleido, multiplier 1000, i.e.
  timestep = 1000 * sigma as in the official sampler) and the Wan 2.1 latent format.

The same object is what the BINDWEAVE_MODEL's ModelPatcher holds, so our Sampler and the native
samplers share one ModelPatcher family (ComfyUI swaps their weight patches correctly).
"""

from __future__ import annotations

import math

import comfy.conds
import comfy.latent_formats
import comfy.model_base
import comfy.patcher_extension
import comfy.supported_models_base
import torch
from torch import nn

from bindweave_core import constants as C
from bindweave_core.denoiser import DiTBranch, dit_velocity
from bindweave_core.lora import original_name
from bindweave_core.setting_bounds import check_setting

PREFIX = "diffusion_model."
# Keys of the extra conditioning a CONDITIONING entry carries (besides the UMT5 states), and the
# DiTBranch field each one fills.
COND_KEYS = {"bindweave_planner": "planner_states", "bindweave_clip": "clip_tokens",
             "bindweave_condition": "condition", "bindweave_reference_latents": "reference_latents"}


def _container(root: nn.Module, path: list[str]) -> nn.Module:
    for part in path:
        child = root._modules.get(part)
        if child is None:
            child = nn.Module()
            root.add_module(part, child)
        root = child
    return root


class OriginalLayout(nn.Module):
    """The DiT's modules registered again under their original Wan names (same objects: a weight
    patched through either name is the one the DiT computes with)."""

    def __init__(self, dit: nn.Module) -> None:
        super().__init__()
        self.bare_keys: list[str] = []  # tensors of containers (ComfyUI's loader patches only leaf modules' tensors)
        for path, module in dit.named_modules():
            own = [(n, t) for n, t in list(module._parameters.items()) + list(module._buffers.items())
                   if t is not None]
            if not own:
                continue
            if not module._modules and path:  # a leaf (Linear, norm, conv): the module itself
                parts = original_name(path).split(".")
                _container(self, parts[:-1]).add_module(parts[-1], module)
                continue
            for name, tensor in own:  # bare tensors of a container (e.g. a block's scale_shift_table)
                parts = original_name(f"{path}.{name}" if path else name).split(".")
                parent = _container(self, parts[:-1])
                self.bare_keys.append(".".join(parts))
                if isinstance(tensor, nn.Parameter):
                    parent.register_parameter(parts[-1], tensor)
                else:
                    parent.register_buffer(parts[-1], tensor)


class BindWeaveDiffusionModel(OriginalLayout):
    """What ComfyUI's ``BaseModel._apply_model`` calls: ``(x, timestep, context, **extra conds)`` ->
    the flow velocity, through the core's ``dit_velocity``."""

    def __init__(self, dit: nn.Module) -> None:
        super().__init__(dit)
        object.__setattr__(self, "dit", dit)  # not a registered child: its tensors are reached through the names above

    @property
    def dtype(self) -> torch.dtype:
        return self.dit.patch_embedding.weight.dtype

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor | None = None,
                transformer_options: dict | None = None, **kwargs) -> torch.Tensor:
        transformer_options = transformer_options or {}
        wrappers = comfy.patcher_extension.get_all_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL,
                                                            transformer_options)
        return comfy.patcher_extension.WrapperExecutor.new_class_executor(self._forward, self, wrappers).execute(
            x, timestep, context, transformer_options, **kwargs)

    def _forward(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor | None,
                 transformer_options: dict, **kwargs) -> torch.Tensor:
        fields = {field: kwargs.get(key) for key, field in COND_KEYS.items()}
        resident = transformer_options.get(RESIDENT_BLOCKS)
        if resident is not None:  # block offload: the DiT computes on the GPU, ComfyUI's sampler holds x on the CPU
            device = place_streamed(self.dit, resident, x)
            moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in fields.items()}
            branch = DiTBranch(context.to(device) if context is not None else None, **moved)
            return dit_velocity(self.dit, x.to(device), timestep.to(device), [branch]).to(x.device)
        # one branch holding the whole batch (ComfyUI may batch the positive and negative entries)
        return dit_velocity(self.dit, x, timestep, [DiTBranch(context, **fields)])


class BindWeaveModelConfig(comfy.supported_models_base.BASE):
    unet_config = {}
    unet_extra_config = {}
    latent_format = comfy.latent_formats.Wan21
    sampling_settings = {"multiplier": C.NUM_TRAIN_TIMESTEPS}  # timestep = 1000 * sigma; the shift is the family's


class BindWeaveNativeModel(comfy.model_base.BaseModel):
    """A ComfyUI flow model whose diffusion model is the core BindWeave / Kaleido DiT."""

    def __init__(self, dit: nn.Module, shift: float) -> None:
        config = BindWeaveModelConfig({"disable_unet_model_creation": True})  # copies the class's sampling_settings
        config.sampling_settings["shift"] = check_setting("shift", shift)
        super().__init__(config, comfy.model_base.ModelType.FLOW)
        self.diffusion_model = BindWeaveDiffusionModel(dit)

    def extra_conds(self, **kwargs) -> dict:
        out = {}
        if kwargs.get("cross_attn") is not None:  # UMT5 states: always 512 tokens, so plain concatenation
            out["c_crossattn"] = comfy.conds.CONDRegular(kwargs["cross_attn"])
        for key in COND_KEYS:
            if kwargs.get(key) is not None:
                out[key] = comfy.conds.CONDRegular(kwargs[key])
        return out

    def memory_required(self, input_shape, cond_shapes={}) -> float:  # noqa: B006 (ComfyUI's signature)
        from bindweave_core.memory import dit_activation_bytes

        dit = self.diffusion_model.dit
        batch, _, frames, h, w = input_shape
        element = dit.patch_embedding.weight.element_size()
        per_item = dit_activation_bytes(dit.dit_config, w * C.VAE_SPATIAL_FACTOR, h * C.VAE_SPATIAL_FACTOR,
                                        (frames - 1) * C.VAE_TEMPORAL_FACTOR + 1, 1, element)
        return per_item * math.ceil(batch)


def patch_bare_parameters(patcher, device_to=None, *args) -> None:
    """ModelPatcher ON_LOAD callback: apply the weight patches of container tensors (the blocks'
    ``modulation`` / ``scale_shift_table``), which ComfyUI's loader skips (it patches the tensors of
    leaf modules only), so a ``.diff`` on them counts as in the core's ``apply_lora``. The backup that
    ``patch_weight_to_device`` takes restores them on unpatch; a key already backed up is patched."""
    for name in patcher.model.diffusion_model.bare_keys:
        key = PREFIX + name
        if key in patcher.patches and key not in patcher.backup:
            patcher.patch_weight_to_device(key, device_to=device_to)


def patch_key(name: str) -> str:
    """The ModelPatcher key of one of our DiT's parameters (diffusers name): the module's original name
    plus the tensor's (``proj_out.weight`` -> ``head.head.weight``; bare tensors by their whole name)."""
    module, _, leaf = name.rpartition(".")
    if module and leaf in ("weight", "bias"):
        return f"{PREFIX}{original_name(module)}.{leaf}"
    return PREFIX + original_name(name)


# ------------------------------------------------------------------------------------------ block offload
# The DiT loader's resident_blocks under native samplers (KSampler, SamplerCustomAdvanced): ComfyUI's memory
# manager keeps the model (and applies its weight patches) on the CPU, as for our Sampler's block offload; on
# the first DiT call of a sampling run the core places the non-block modules and the resident blocks on the GPU
# and streams the others (bindweave_core.dit.offload), after asking ComfyUI to free room for them; when the
# run ends (an OUTER_SAMPLE wrapper) everything goes back to the CPU. The arithmetic is the DiT's own, so the
# latents equal the unswapped run's.
RESIDENT_BLOCKS = "bindweave_resident_blocks"  # transformer_options key: blocks kept on the GPU
OFFLOAD_WRAPPER = "bindweave_block_offload"


def with_block_offload(patcher, resident_blocks: int):
    """A clone of the DiT's ModelPatcher whose DiT runs with block offload under ComfyUI's samplers."""
    clone = patcher.clone()
    options = dict(clone.model_options.get("transformer_options", {}))
    options[RESIDENT_BLOCKS] = int(resident_blocks)
    clone.model_options["transformer_options"] = options
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, OFFLOAD_WRAPPER, _release_after)
    return clone


def place_streamed(dit: nn.Module, resident_blocks: int, x: torch.Tensor) -> torch.device:
    """Put the DiT on the GPU with ``resident_blocks`` blocks resident (once per sampling run); its device."""
    import comfy.model_management as mm

    from bindweave_core import constants as C
    from bindweave_core.memory import RunShape, estimate_vram
    from bindweave_core.runtime import RuntimeOptions, place_dit

    device = torch.device(mm.get_torch_device())
    offload = getattr(dit, "block_offload", None)
    if offload is None or offload.device.type != device.type:
        batch, _, frames, h, w = x.shape
        shape = RunShape(w * C.VAE_SPATIAL_FACTOR, h * C.VAE_SPATIAL_FACTOR, (frames - 1) * C.VAE_TEMPORAL_FACTOR + 1,
                         batch=batch, dtype=dit.patch_embedding.weight.dtype, resident_blocks=resident_blocks)
        if device.type != "cpu":
            mm.free_memory(estimate_vram(dit.dit_config, shape).total, device)
        place_dit(dit, RuntimeOptions(block_offload=resident_blocks, memory_check=False), device)
    return device


def _release_after(executor, *args, **kwargs):
    """OUTER_SAMPLE wrapper: after the sampling run, the streamed DiT back to the CPU where ComfyUI keeps it."""
    from bindweave_core.dit.offload import disable_block_offload

    try:
        return executor(*args, **kwargs)
    finally:
        dit = executor.class_obj.model_patcher.model.diffusion_model.dit
        disable_block_offload(dit)
        dit.to("cpu")


def conditioning(branch: DiTBranch) -> list:
    """One guidance branch as a native CONDITIONING: the UMT5 states as the cross-attention tensor,
    the other branch tensors as extra conditioning read back by :class:`BindWeaveNativeModel`."""
    extra = {key: getattr(branch, field) for key, field in COND_KEYS.items() if getattr(branch, field) is not None}
    return [[branch.text_states, extra]]

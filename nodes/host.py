"""Everything that talks to ComfyUI: model folders, ModelPatcher memory management, progress, cancel.

Only this module and ``comfy_nodes.py`` import ComfyUI; the node logic itself is the core library's
pipeline stages.
"""

from __future__ import annotations

import logging
import os
import re
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import comfy.model_management as mm
import comfy.model_patcher
import comfy.utils
import folder_paths
import torch

from bindweave_core import constants as C
from bindweave_core import dtypes
from bindweave_core.encoders.base import Encoder
from bindweave_core.errors import OutOfMemoryError
from bindweave_core.sampling import ProgressCallback

from .specs import AUTO_PRECISION, GGUF_FOLDER, MODEL_FOLDER, In

log = logging.getLogger("BindWeave")

_SHARD = re.compile(r"-\d{5}-of-\d{5}\.safetensors$")


def register_model_folder() -> None:
    """``models/bindweave/``: Hugging Face directories (Qwen2.5-VL-7B-Instruct, BindWeave, Kaleido); and
    ``.gguf`` DiT files in the diffusion model folders (``models/unet/``, ``models/diffusion_models/``),
    which ComfyUI lists for its own extensions only."""
    path = os.path.join(folder_paths.models_dir, MODEL_FOLDER)
    folder_paths.add_model_folder_path(MODEL_FOLDER, path)
    try:
        dit_paths = list(folder_paths.get_folder_paths("diffusion_models"))
    except KeyError:  # older ComfyUI: "unet" only
        dit_paths = [os.path.join(folder_paths.models_dir, "unet")]
    folder_paths.folder_names_and_paths[GGUF_FOLDER] = (dit_paths, {".gguf"})


def use_comfy_memory_manager() -> None:
    """Let ComfyUI's memory manager answer the core's cache-release, free-memory and make-room requests."""
    from bindweave_core.device_memory import use_host_memory_manager

    use_host_memory_manager(release=mm.soft_empty_cache, free_bytes=mm.get_free_memory, make_room=make_room)


def _model_directories() -> list[str]:
    """Model directories in models/bindweave: every sub-folder (a Hugging Face or Kaleido download), and
    the component folders inside them that carry their own config.json (e.g. ``.../vae``)."""
    found = []
    for root in folder_paths.get_folder_paths(MODEL_FOLDER):
        base = Path(root)
        if not base.is_dir():
            continue
        for path in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
            found.append(f"{MODEL_FOLDER}/{path.name}/")
            found += [f"{MODEL_FOLDER}/{path.name}/{sub.name}/" for sub in sorted(path.iterdir())
                      if sub.is_dir() and (sub / "config.json").exists()]
    return found


def choices(spec: In) -> list[str]:
    """The combo entries of a file input: built-in choices, then files, then model directories."""
    items = list(spec.smoke)
    for folder in spec.files:
        try:
            items += folder_paths.get_filename_list(folder)
        except KeyError:  # folder unknown to this ComfyUI version
            continue
    if spec.directories:
        items += _model_directories()
    return items or [""]


def resolve(name: str, folders: tuple[str, ...]) -> str:
    """The path of a combo entry (a file in one of ``folders``, or a models/bindweave directory)."""
    if name.startswith(MODEL_FOLDER + "/") and name.endswith("/"):
        rel = name[len(MODEL_FOLDER) + 1:].strip("/")
        for root in folder_paths.get_folder_paths(MODEL_FOLDER):
            if (Path(root) / rel).is_dir():
                return str(Path(root) / rel)
    for folder in folders:
        path = folder_paths.get_full_path(folder, name)
        if path is not None:
            # a shard of a diffusers directory stands for the whole directory
            if _SHARD.search(path) and any(Path(path).parent.glob("*.safetensors.index.json")):
                return str(Path(path).parent)
            return path
    raise FileNotFoundError(f"model file '{name}' not found in models/{' or models/'.join(folders)}; "
                            "refresh the node list (R) or put the file there.")


def devices(kind: str) -> tuple[torch.device, torch.device]:
    """Where ComfyUI loads and offloads this kind of model: the DiT as its diffusion models, the VAE as
    its VAEs, the encoders (UMT5, CLIP vision, planner) as its text encoders."""
    if kind == "dit":
        return mm.get_torch_device(), mm.unet_offload_device()
    if kind == "vae":
        return mm.vae_device(), mm.vae_offload_device()
    return mm.text_encoder_device(), mm.text_encoder_offload_device()


def torch_dtype(choice: str, kind: str, what: str) -> torch.dtype:
    """The loader's precision: ``auto`` as :data:`specs.AUTO_PRECISION` says for this kind of model, from
    ComfyUI's own answers about the device the model computes on; the choice is logged (one line)."""
    if choice != "auto":
        return dtypes.torch_dtype(choice)
    name, reason = _auto_precision(kind)
    log.info("%s precision (auto): %s, %s", what, name, reason)
    return dtypes.torch_dtype(name)


def _auto_precision(kind: str) -> tuple[str, str]:
    """``(dtype name, why)``. Not ComfyUI's text_encoder_dtype()/unet_dtype(): those prefer fp16 even where
    bf16, the official precision, is supported (fp16's range is too small for the 7B planner's activations)."""
    rule = AUTO_PRECISION[kind]
    for name in C.DTYPE_NAMES:  # the user's launch flag for this kind of model (e.g. --fp32-text-enc) first
        if getattr(mm.args, f"{name}_{rule.flag.replace('-', '_')}", False):
            return name, f"ComfyUI was started with --{name}-{rule.flag}"
    device = devices(kind)[0]
    if mm.is_device_cpu(device):
        return "fp32", "the model runs on the CPU"
    if mm.should_use_bf16(device):
        return C.OFFICIAL_DTYPE, f"the official run's precision, supported on {device}"
    if rule.fallback == "fp16" and mm.should_use_fp16(device):
        return "fp16", f"{device} does not support bf16"
    return "fp32", f"{device} does not support bf16" + (" or fp16" if rule.fallback == "fp16" else "")


class Hosted(torch.nn.Module):
    """Holds a model for ComfyUI's ModelPatcher, which keeps a plain ``device`` attribute on the module
    it manages (transformers/diffusers models have a read-only ``device`` property). Parameter names
    get the prefix ``model.``."""

    PREFIX = "model."

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.device = None


@dataclass
class Loaded:
    """A BindWeave model inside ComfyUI: our wrapper (``component``) and the ModelPatcher that lets
    ComfyUI's memory manager load and offload its module (``patcher.model``)."""

    component: Encoder | torch.nn.Module  # an encoder, or the DiT
    patcher: comfy.model_patcher.ModelPatcher
    kind: str
    # DiT block offload: blocks kept on the GPU while sampling (None: ComfyUI loads the whole model)
    resident_blocks: int | None = None

    @property
    def device(self) -> torch.device:
        """Where the model computes (with block offload ComfyUI keeps it on the offload device)."""
        if self.resident_blocks is not None:
            return torch.device(mm.get_torch_device())
        return torch.device(self.patcher.load_device)

    def clone(self) -> "Loaded":
        return Loaded(self.component, self.patcher.clone(), self.kind, self.resident_blocks)


def wrap(component: Encoder | torch.nn.Module, kind: str, resident_blocks: int | None = None) -> Loaded:
    """A ModelPatcher over ``component``. With ``resident_blocks`` (DiT block offload) ComfyUI loads it
    to the offload device, where its weight patches (LoRAs) are applied; the sampler then streams the
    blocks to the GPU itself (:func:`make_room` first)."""
    module = component if isinstance(component, torch.nn.Module) else component.model
    if kind == "dit" and resident_blocks is not None:
        load = offload = torch.device("cpu")  # the streamed blocks live in CPU RAM whatever the VRAM mode
    else:
        load, offload = devices(kind)
    if kind == "dit":
        # the native ComfyUI model class over the DiT: the same ModelPatcher serves our Sampler and the
        # native samplers (MODEL). In-place weight updates: the original-name view shares the DiT's tensors.
        from comfy.patcher_extension import CallbacksMP

        from bindweave_core.pipeline import defaults_for

        from .native import BindWeaveNativeModel, patch_bare_parameters

        native = BindWeaveNativeModel(module, defaults_for(component.dit_config.family)["shift"])
        patcher = comfy.model_patcher.ModelPatcher(native, load_device=load, offload_device=offload,
                                                   weight_inplace_update=True)
        patcher.add_callback(CallbacksMP.ON_LOAD, patch_bare_parameters)
    else:
        patcher = comfy.model_patcher.ModelPatcher(Hosted(module), load_device=load, offload_device=offload)
    return Loaded(component, patcher, kind, resident_blocks)


# The ModelPatchers the running node asked for (load_to_device): make_room never unloads them.
_in_use: weakref.WeakSet = weakref.WeakSet()


def make_room(device: torch.device, memory_required: int) -> None:
    """Ask ComfyUI to unload idle models until ``memory_required`` bytes are free on ``device``: before the
    core decides on free memory (cfg batching), and for the part of a block-offloaded DiT that the
    sampler puts there itself. The models the running node uses stay loaded."""
    if device.type == "cpu":
        return
    keep = [loaded for loaded in mm.current_loaded_models if loaded.model in _in_use]
    mm.free_memory(memory_required, device, keep_loaded=keep)


def load_to_device(*models: Loaded, memory_required: int = 0) -> None:
    """Ask ComfyUI to put these models on their device (freeing others as needed).

    Our modules are plain torch modules, so they are loaded whole (``force_full_load``); when that does
    not fit, the message says what to change instead of ComfyUI's generic CUDA error.
    """
    _in_use.clear()
    _in_use.update(m.patcher for m in models)
    try:
        mm.load_models_gpu([m.patcher for m in models], memory_required=memory_required, force_full_load=True)
    except torch.OutOfMemoryError as e:
        names = ", ".join(m.kind for m in models)
        raise OutOfMemoryError(
            f"not enough GPU memory to load the {names}: {e}. Use weight_format fp8 on the DiT loader, a smaller "
            "width/height/length, cfg_batch separate, or close other workflows' models (Unload Models).") from e


def progress(total: int, preview: bool = False) -> ProgressCallback:
    """A sampler callback that drives ComfyUI's progress bar and honours its cancel button.

    With ``preview`` it also sends a live preview of the current latents (first latent frame) through
    ComfyUI's own previewer for the Wan 2.1 latent format, when the user's preview method is not "none".
    Our latents are the DiT's normalised ones, the space ComfyUI's Wan 2.1 RGB factors are made for.
    """
    bar = comfy.utils.ProgressBar(total)
    previewer = _wan_previewer() if preview else None

    def callback(step: int, steps: int, latents: torch.Tensor) -> None:
        mm.throw_exception_if_processing_interrupted()
        image = previewer.decode_latent_to_preview_image("JPEG", latents.float()) if previewer else None
        bar.update_absolute(step, steps, image)

    return callback


def _wan_previewer() -> Any:
    import comfy.latent_formats
    import latent_preview

    return latent_preview.get_previewer(mm.get_torch_device(), comfy.latent_formats.Wan21())


class ChunkProgress:
    """A callback for the core's VAE chunk hook: ComfyUI's progress bar, and its cancel button honoured
    before each chunk (so Reference Encode stops within one chunk)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.bar = comfy.utils.ProgressBar(total)

    def __call__(self, done: int) -> None:
        mm.throw_exception_if_processing_interrupted()
        self.bar.update_absolute(min(done, self.total), self.total)

    def finish(self) -> None:
        self.bar.update_absolute(self.total, self.total)


def qwen_tokenizer_dir() -> str | None:
    """The Qwen2.5 tokenizer ComfyUI bundles (comfy/text_encoders/qwen25_tokenizer)."""
    import comfy.text_encoders

    path = Path(comfy.text_encoders.__file__).parent / "qwen25_tokenizer"
    return str(path) if path.is_dir() else None


def lora_patches(path: str, dit: torch.nn.Module) -> dict:
    """A LoRA file as ModelPatcher weight patches on our DiT (applied by ComfyUI when it loads the model).

    ``bindweave_core.lora`` reads every supported key layout and maps it onto our parameter names;
    ComfyUI's own LoRA adapter then does the patching (FP8 weights through FP8Linear's
    ``convert_weight``/``set_weight``).
    """
    from bindweave_core.lora import load_lora

    lora = load_lora(path)
    lora.check(dit)
    try:
        from comfy.weight_adapter.lora import LoRAAdapter
    except ImportError:  # older ComfyUI: tuple patches
        def LoRAAdapter(keys, weights):  # noqa: N802
            return ("lora", weights)
    from .native import patch_key

    patches = {}
    for key, layer in lora.weight_patches().items():
        patches[patch_key(key)] = LoRAAdapter(set(), (layer.up, layer.down, layer.alpha, None, None, None))
    for key, diff in lora.diffs.items():
        patches[patch_key(key)] = ("diff", (diff,))
    return patches

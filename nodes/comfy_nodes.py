"""The BindWeave nodes for ComfyUI (V3 schema). Each ``execute`` is a thin call into the core pipeline.

The inputs, tooltips and descriptions are defined once in ``specs.py``.
"""

from __future__ import annotations

import weakref
from functools import lru_cache
from typing import ClassVar

import comfy.model_management as mm
import numpy as np
import torch
from comfy_api.latest import ComfyExtension, io, ui
from typing_extensions import override

from bindweave_core.conditioning import PlannerStates, ReferenceCondition, TextStates, VideoGeometry
from bindweave_core.errors import InputError
from bindweave_core.families import family_for
from bindweave_core.memory import FIT_MARGIN, dit_activation_bytes, estimate_vram
from bindweave_core.pipeline import BindWeavePipeline, GenerationSettings
from bindweave_core.references import tensor_to_pil
from bindweave_core.runtime import RuntimeOptions, dit_description, run_shape
from bindweave_core.sampling import guidance_batch
from bindweave_core.setting_bounds import check_setting

from . import host
from .convert import (
    ReferenceImages,
    collect_references,
    latent_output,
    latent_stats,
    latents_from,
    normalise,
    wired_references,
)
from .specs import (
    CLIP_VISION_LOADER,
    DECODE,
    DIT_FOLDERS,
    ENCODER_LOADERS,
    EVALUATE,
    LOAD_DIT,
    LORA,
    NATIVE_CONDITIONING,
    NATIVE_MODEL,
    NOISE,
    PLANNER_ENCODE,
    PLANNER_LOADER,
    REFERENCE_ENCODE,
    REFERENCE_IMAGES_NODE,
    SAMPLER,
    SIGMAS,
    SMOKE_CHOICE,
    SMOKE_KALEIDO_CHOICE,
    TEXT_ENCODE,
    TEXT_ENCODER_LOADER,
    VAE_LOADER,
    EncoderLoader,
    In,
    NodeSpec,
)

MAX_EVALUATED_REFERENCES = 16  # a batched IMAGE may hold more than the 4 a generation takes
SMOKE_DIT_FAMILIES = {SMOKE_CHOICE: "bindweave", SMOKE_KALEIDO_CHOICE: "kaleido"}  # Load DiT's smoke choices
_SOCKETS = {"IMAGE": io.Image, "MASK": io.Mask, "LATENT": io.Latent, "STRING": io.String, "FLOAT": io.Float,
            "MODEL": io.Model, "CONDITIONING": io.Conditioning, "SIGMAS": io.Sigmas, "VAE": io.Vae,
            "NOISE": io.Noise, "CLIP": io.Clip, "CLIP_VISION": io.ClipVision}


@lru_cache(maxsize=None)
def _io_type(name: str):
    return _SOCKETS.get(name) or io.Custom(name)


def _input(i: In):
    common = dict(optional=i.optional, tooltip=i.tooltip)
    if i.kind == "combo":
        options = list(i.options) if i.options else host.choices(i)
        default = i.default if i.default is not None else options[0]
        return io.Combo.Input(i.name, options=options, default=default, **common)
    if i.kind == "int":
        return io.Int.Input(i.name, default=i.default, min=i.min, max=i.max, step=i.step,
                            control_after_generate=True if i.seed else None, **common)
    if i.kind == "float":
        return io.Float.Input(i.name, default=i.default, min=i.min, max=i.max, step=i.step, **common)
    if i.kind == "string":
        return io.String.Input(i.name, default=i.default, multiline=i.multiline, **common)
    if i.kind == "boolean":
        return io.Boolean.Input(i.name, default=i.default, **common)
    if "," in i.type:  # one of several socket types (e.g. our VAE or ComfyUI's)
        return io.MultiType.Input(i.name, types=[_io_type(t) for t in i.type.split(",")], **common)
    return _io_type(i.type).Input(i.name, **common)


def _output_id(name: str, spec: NodeSpec) -> str:
    """An output's id; ComfyUI 0.3.64 refuses a node whose output id is also an input's (Planner Encode's
    prompt), so such an output gets another id under the same displayed name."""
    return f"{name}_output" if any(i.name == name for i in spec.inputs) else name


def schema(spec: NodeSpec) -> io.Schema:
    return io.Schema(
        node_id=spec.node_id, display_name=spec.display_name, category=spec.category, description=spec.description,
        inputs=[_input(i) for i in spec.inputs],
        outputs=[_io_type(o.type).Output(_output_id(o.name, spec), display_name=o.name, tooltip=o.tooltip)
                 for o in spec.outputs],
        is_output_node=spec.output_node,
    )


def _stage(device: torch.device, offload: str = "none", runtime: RuntimeOptions | None = None,
           **components) -> BindWeavePipeline:
    """The core pipeline over the given models, with ComfyUI in charge of where they live."""
    full = {**dict.fromkeys(("dit", "vae", "text_encoder", "clip_vision", "planner")), **components}
    return BindWeavePipeline(**full, device=device, offload=offload, runtime=runtime)


def _to_intermediate(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(mm.intermediate_device())


# ------------------------------------------------------------------------------------------ loaders
class LoadDiT(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(LOAD_DIT)

    @classmethod
    def execute(cls, model_name, dtype, weight_format, attention, resident_blocks=-1) -> io.NodeOutput:
        from bindweave_core.dit.loading import load_dit
        from bindweave_core.smoke import smoke_dit

        if model_name in (SMOKE_CHOICE, SMOKE_KALEIDO_CHOICE):
            dit = smoke_dit(0, family_for(SMOKE_DIT_FAMILIES[model_name]).smoke_preset)
            dit.set_attention_backend(attention)
        else:
            dit = load_dit(host.resolve(model_name, DIT_FOLDERS), dtype=host.torch_dtype(dtype, "dit", "DiT"),
                           weight_format=weight_format, attention_backend=attention)
        return io.NodeOutput(host.wrap(dit, "dit", resident_blocks=None if resident_blocks < 0 else resident_blocks))


class EncoderLoaderNode(io.ComfyNode):
    """The shared body of the four encoder loaders (one row of ``specs.ENCODER_LOADERS`` each): the smoke
    model or the chosen file, loaded by the encoder's own ``load`` (or ``tiny``) and handed to ComfyUI's
    memory manager."""

    row: ClassVar[EncoderLoader]

    @classmethod
    def define_schema(cls):
        return schema(cls.row.spec)

    @classmethod
    def execute(cls, dtype, **inputs) -> io.NodeOutput:
        row = cls.row
        encoder = row.encoder()
        choice = inputs.pop(row.file_input)
        if choice == SMOKE_CHOICE:
            return io.NodeOutput(host.wrap(encoder.tiny(0), row.memory_kind))
        options = {i.name: inputs.get(i.name, i.default) for i in row.options}
        options = {k: (None if v == "" else v) for k, v in options.items()}  # an empty text box: not given
        if row.comfy_tokenizer:
            options["tokenizer_dir"] = host.qwen_tokenizer_dir()
        loaded = encoder.load(host.resolve(choice, row.folders),
                              dtype=host.torch_dtype(dtype, row.memory_kind, row.what), **options)
        return io.NodeOutput(host.wrap(loaded, row.memory_kind))


class LoadVAE(EncoderLoaderNode):
    row = VAE_LOADER


class LoadTextEncoder(EncoderLoaderNode):
    row = TEXT_ENCODER_LOADER


class LoadCLIPVision(EncoderLoaderNode):
    row = CLIP_VISION_LOADER


class LoadPlanner(EncoderLoaderNode):
    row = PLANNER_LOADER


# ------------------------------------------------------------------------------------------ ComfyUI's own models
_NATIVE_OF = weakref.WeakKeyDictionary()  # ComfyUI's loaded model -> {our kind: our encoder over its tensors}


def ours(model, kind: str) -> host.Loaded:
    """The encoder of one of our loaders as it is, or ComfyUI's own loaded model (Load VAE, Load CLIP Vision,
    Load CLIP type wan / qwen_image) as our encoder over the same tensors (``native_inputs``), made once per
    ComfyUI model; it computes in the precision our loaders' ``auto`` picks."""
    from . import native_inputs as native

    if isinstance(model, host.Loaded):
        return model
    made = _NATIVE_OF.setdefault(model, {})
    if kind not in made:
        row = next(r for r in ENCODER_LOADERS if r.memory_kind == kind)
        dtype = host.torch_dtype("auto", row.memory_kind, row.what)
        if kind == "vae" and native.is_native_vae(model):
            component = native.wan_vae_from_native(model)
        elif kind == "clip_vision" and native.is_native_clip_vision(model):
            component = native.clip_vision_from_native(model, dtype)
        elif kind == "text_encoder" and native.is_native_clip(model):
            component = native.text_encoder_from_native(model, dtype)
        elif kind == "planner" and native.is_native_clip(model):
            component = native.planner_from_native(model, dtype, host.qwen_tokenizer_dir())
        else:
            raise InputError(f"a {model.__class__.__name__} is connected where the {row.what} goes: connect "
                             f"{row.display_name} (or ComfyUI's own loader of that model).")
        made[kind] = host.wrap(component, kind)
    return made[kind]


# ------------------------------------------------------------------------------------------ conditioning
class References(io.ComfyNode):
    """The references wired once: Planner Encode and Reference Encode read the same images and masks."""

    @classmethod
    def define_schema(cls):
        return schema(REFERENCE_IMAGES_NODE)

    @classmethod
    def execute(cls, image_1, image_2=None, image_3=None, image_4=None, mask_1=None, mask_2=None, mask_3=None,
                mask_4=None, invert_masks=True) -> io.NodeOutput:
        images, masks = collect_references([image_1, image_2, image_3, image_4], [mask_1, mask_2, mask_3, mask_4],
                                           invert_masks=invert_masks)
        return io.NodeOutput(ReferenceImages(tuple(images), tuple(masks) if masks is not None else None))


class PlannerEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(PLANNER_ENCODE)

    @classmethod
    def execute(cls, planner, prompt, negative_prompt, refine_prompt, refine_seed, reference_images=None,
                image_1=None, image_2=None, image_3=None, image_4=None) -> io.NodeOutput:
        refs, _ = wired_references(reference_images, [image_1, image_2, image_3, image_4])
        images = [tensor_to_pil(r) for r in refs]
        planner = ours(planner, "planner")
        host.load_to_device(planner)
        pipe = _stage(planner.device, planner=planner.component)
        used = pipe.refine_prompt(prompt, images, seed=refine_seed or None) if refine_prompt else prompt
        states = pipe.encode_planner(used, images, negative_prompt)
        out = PlannerStates(_to_intermediate(states.positive), _to_intermediate(states.negative), used)
        return io.NodeOutput(out, used)


class TextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(TEXT_ENCODE)

    @classmethod
    def execute(cls, text_encoder, prompt, negative_prompt) -> io.NodeOutput:
        text_encoder = ours(text_encoder, "text_encoder")
        host.load_to_device(text_encoder)
        states = _stage(text_encoder.device, text_encoder=text_encoder.component).encode_text(prompt, negative_prompt)
        return io.NodeOutput(TextStates(_to_intermediate(states.positive), _to_intermediate(states.negative)))


class ReferenceEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(REFERENCE_ENCODE)

    @classmethod
    def execute(cls, vae, width, height, length, mode, mask_mode, reference_images=None, image_1=None, image_2=None,
                image_3=None, image_4=None, clip_vision=None, mask_1=None, mask_2=None, mask_3=None, mask_4=None,
                invert_masks=True) -> io.NodeOutput:
        family = family_for(mode)  # the mode names the family whose references to make
        images, masks = wired_references(reference_images, [image_1, image_2, image_3, image_4],
                                         [mask_1, mask_2, mask_3, mask_4], invert_masks=invert_masks,
                                         max_references=family.max_references)
        settings = GenerationSettings(prompt="(references)", width=width, height=height, num_frames=length,
                                      mask_mode=mask_mode)  # the count was checked by collect_references
        uses_clip = "clip_vision" in family.reference_encoders
        if uses_clip and clip_vision is None:
            raise InputError(f"{mode} mode needs the CLIP vision encoder: connect Load BindWeave CLIP Vision.")
        vae = ours(vae, "vae")  # ComfyUI's own VAE: our WanVAE over its tensors
        clip_vision = ours(clip_vision, "clip_vision") if uses_clip else None
        host.load_to_device(*[vae] + ([clip_vision] if uses_clip else []))
        pipe = _stage(vae.device, vae=vae.component, clip_vision=clip_vision.component if clip_vision else None)
        # VAE chunks: one per reference, then any video condition's (a cached condition skips those)
        report = host.ChunkProgress(family.reference_vae_chunks(len(images), length))
        with vae.component.chunk_progress(report):
            refs = pipe.encode_references(images, settings, masks, family=mode)
        report.finish()
        refs = ReferenceCondition(
            clip_tokens=_to_intermediate(refs.clip_tokens), slots=_to_intermediate(refs.slots),
            canvases=refs.canvases, masks=refs.masks, latents=_to_intermediate(refs.latents), family=refs.family,
            video_condition=refs.video_condition,
            # the VAE's statistics: the Sampler's LATENT is in this VAE's raw space
            geometry=VideoGeometry(width, height, length, latents_mean=tuple(vae.component.latents_mean.tolist()),
                                   latents_std=tuple(vae.component.latents_std.tolist())))
        return io.NodeOutput(refs, refs.canvases.to(mm.intermediate_device()), refs.masks.to(mm.intermediate_device()))


# ------------------------------------------------------------------------------------------ sampling
class Sampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(SAMPLER)

    @classmethod
    def execute(cls, model, text_conditioning, references, seed, steps, guidance, shift, sampler, cfg_batch,
                step_cache=0.0, planner_conditioning=None) -> io.NodeOutput:
        dit = model.component
        family = family_for(dit.dit_config)
        refs: ReferenceCondition = references
        if family_for(refs.family).conditioning != family.conditioning:
            raise InputError(f"the references were encoded in {refs.family} mode but the DiT is a "
                             f"{family.name} model: set Reference Encode's mode to match the loaded DiT.")
        if family.requires_planner and planner_conditioning is None:
            raise InputError("BindWeave models need the planner: connect BindWeave Planner Encode to "
                             "planner_conditioning.")
        geometry = refs.geometry
        settings = GenerationSettings(prompt="(conditioning)", width=geometry.width, height=geometry.height,
                                      num_frames=geometry.num_frames, steps=steps, guidance=guidance, shift=shift,
                                      sampler=sampler, seed=seed, cfg_batch=cfg_batch, step_cache=step_cache)
        family.check_reference_count(refs.num_references)
        pipe = _sampling_stage(model, settings)
        cond, uncond = pipe.branches(text_conditioning, planner_conditioning, refs)
        latents = pipe.sample(cond, uncond, settings, host.progress(steps, preview=True))
        return io.NodeOutput(latent_output(latents, *latent_stats(geometry)))


def _sampling_stage(model: host.Loaded, settings: GenerationSettings) -> BindWeavePipeline:
    """The DiT on its device: loaded whole by ComfyUI, or (block offload) loaded by ComfyUI to the offload
    device with its patches applied, then the non-block modules and resident blocks placed by the core,
    which streams the other blocks while sampling and moves everything back afterwards."""
    dit = model.component
    element = dit.patch_embedding.weight.element_size()
    if model.resident_blocks is None:
        host.load_to_device(model, memory_required=dit_activation_bytes(dit.dit_config, settings.width, settings.height,
                                                                        settings.num_frames, 2, element))
        return _stage(model.device, dit=dit)
    host.load_to_device(model)
    pipe = _stage(model.device, offload="model", dit=dit,
                  runtime=RuntimeOptions(block_offload=model.resident_blocks, memory_check=False))
    config, dtype, fmt = dit_description(pipe)
    batch = guidance_batch(settings.guidance, settings.cfg_batch != "separate")
    host.make_room(pipe.device, int(FIT_MARGIN * estimate_vram(config, run_shape(pipe, settings, dtype, fmt, batch)).total))
    return pipe


class Decode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(DECODE)

    @classmethod
    def execute(cls, vae, samples, tiled, fps) -> io.NodeOutput:
        vae = ours(vae, "vae")
        host.load_to_device(vae)
        component = vae.component
        latents = normalise(latents_from(samples), component.latents_mean.tolist(), component.latents_std.tolist())
        if tiled:
            component.enable_tiling()
        try:
            frames = _stage(vae.device, vae=component).decode(latents)
        finally:
            if tiled:
                component.disable_tiling()
        return io.NodeOutput(frames.to(mm.intermediate_device()), float(fps))


class LoraLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(LORA)

    @classmethod
    def execute(cls, model, lora_name, strength) -> io.NodeOutput:
        path = host.resolve(lora_name, ("loras",))
        patched = model.clone()
        patches = host.lora_patches(path, model.component)
        missed = set(patches) - set(patched.patcher.add_patches(patches, strength))
        if missed:  # a name mapping gap: say so rather than sample without part of the LoRA
            raise InputError(f"{lora_name}: {len(missed)} LoRA weights found no DiT weight to patch "
                             f"({', '.join(sorted(missed)[:4])}); please report this with the LoRA file's source.")
        return io.NodeOutput(patched)


# ------------------------------------------------------------------------------------------ native route
class NativeModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(NATIVE_MODEL)

    @classmethod
    def execute(cls, model) -> io.NodeOutput:
        if model.resident_blocks is not None:  # block offload under ComfyUI's samplers (native.with_block_offload)
            from .native import with_block_offload

            return io.NodeOutput(with_block_offload(model.patcher, model.resident_blocks))
        return io.NodeOutput(model.patcher.clone())  # a clone: ComfyUI swaps the weight patches of its family


class NativeConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(NATIVE_CONDITIONING)

    @classmethod
    def execute(cls, text_conditioning, references, planner_conditioning=None) -> io.NodeOutput:
        from .native import conditioning

        refs: ReferenceCondition = references
        if family_for(refs.family).requires_planner and planner_conditioning is None:
            raise InputError("BindWeave models need the planner: connect BindWeave Planner Encode to "
                             "planner_conditioning (Kaleido references need none).")
        cond, uncond = _stage(mm.intermediate_device()).branches(text_conditioning, planner_conditioning, refs)
        geometry = refs.geometry
        shape = GenerationSettings(prompt="(conditioning)", width=geometry.width, height=geometry.height,
                                   num_frames=geometry.num_frames).latent_shape
        return io.NodeOutput(conditioning(cond), conditioning(uncond), {"samples": torch.zeros(shape)})


class Sigmas(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(SIGMAS)

    @classmethod
    def execute(cls, steps, shift, schedule) -> io.NodeOutput:
        from bindweave_core.sampling import make_scheduler

        # the settings' one validator (the same bounds as the Sampler's and the CLI's)
        steps, shift = check_setting("steps", steps), check_setting("shift", shift)
        scheduler = make_scheduler(check_setting("sampler", schedule), shift)
        scheduler.set_timesteps(steps, device="cpu")
        return io.NodeOutput(scheduler.sigmas.float().cpu())


class OfficialNoise:
    """ComfyUI's NOISE interface (``seed``, ``generate_noise(latent)``) over the core's official noise."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def generate_noise(self, input_latent: dict) -> torch.Tensor:
        from bindweave_core.sampling import seeded_noise

        return seeded_noise(tuple(input_latent["samples"].shape), self.seed)


class Noise(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(NOISE)

    @classmethod
    def execute(cls, noise_seed) -> io.NodeOutput:
        return io.NodeOutput(OfficialNoise(noise_seed))


# ------------------------------------------------------------------------------------------ evaluation
class Evaluate(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(EVALUATE)

    @classmethod
    def execute(cls, frames, clip_vision, image_1, samples, regions, image_2=None, image_3=None, image_4=None,
                prompt="", windows="", dino_dir="", face_model_dir="") -> io.NodeOutput:
        import json

        from bindweave_core.evaluate.plot import draw_plot
        from bindweave_core.evaluate.report import EvaluationOptions, evaluate_video, summary_text

        refs, _ = collect_references([image_1, image_2, image_3, image_4], max_references=MAX_EVALUATED_REFERENCES)
        options = EvaluationOptions(samples=samples, regions=regions, dino=dino_dir.strip() or None,
                                    face_models=face_model_dir.strip() or None, windows=windows.strip() or None,
                                    prompt=prompt or None)
        host.load_to_device(clip_vision)
        report = evaluate_video(frames, list(refs), clip_vision.component, options)
        plot = torch.from_numpy(np.asarray(draw_plot(report), dtype=np.float32) / 255.0).unsqueeze(0)
        return io.NodeOutput(plot, summary_text(report), json.dumps(report, indent=2, default=str),
                             ui=ui.PreviewImage(plot, cls=cls))


NODES: list[type[io.ComfyNode]] = [LoadDiT, LoadVAE, LoadTextEncoder, LoadCLIPVision, LoadPlanner, PlannerEncode,
                                   TextEncode, ReferenceEncode, Sampler, Decode, LoraLoader, NativeModel,
                                   NativeConditioning, Sigmas, Noise, References, Evaluate]


class BindWeaveExtension(ComfyExtension):
    _ready = False

    def _set_up(self) -> None:
        if not BindWeaveExtension._ready:
            host.register_model_folder()
            host.use_comfy_memory_manager()
            BindWeaveExtension._ready = True

    @override
    async def on_load(self) -> None:
        self._set_up()

    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        self._set_up()  # ComfyUI 0.3.64 asks for the nodes (and builds their schemas) without calling on_load
        return NODES


async def comfy_entrypoint() -> ComfyExtension:
    return BindWeaveExtension()

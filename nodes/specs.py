"""The BindWeave nodes' interface, described without ComfyUI.

Every node's id, inputs (with their tooltips and defaults), outputs and description live here, as
plain data. ``nodes/comfy_nodes.py`` turns them into ComfyUI V3 schemas; the tests read them
without a ComfyUI install (e.g. to check the example workflows' widgets).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bindweave_core import constants as C
from bindweave_core.config import get_preset
from bindweave_core.sampling import SAMPLERS
from bindweave_core.setting_bounds import SETTINGS

if TYPE_CHECKING:
    from bindweave_core.encoders.base import Encoder

CATEGORY = "BindWeave"
SMOKE_CHOICE = "tiny smoke test (random weights)"
SMOKE_KALEIDO_CHOICE = "tiny smoke test, Kaleido R-RoPE (random weights)"
MODEL_FOLDER = "bindweave"  # models/bindweave/: Hugging Face directories (Qwen2.5-VL, BindWeave, Kaleido)
GGUF_FOLDER = "bindweave_gguf"  # .gguf files in models/unet/ and models/diffusion_models/ (host.register_model_folder)
DIT_FOLDERS = ("diffusion_models", GGUF_FOLDER)
MAX_DIT_BLOCKS = get_preset("bindweave-14b").num_layers

# Custom types passed between BindWeave nodes.
DIT = "BINDWEAVE_MODEL"
VAE = "BINDWEAVE_VAE"
TEXT_ENCODER = "BINDWEAVE_TEXT_ENCODER"
CLIP_VISION = "BINDWEAVE_CLIP_VISION"
PLANNER = "BINDWEAVE_PLANNER"
PLANNER_COND = "BINDWEAVE_PLANNER_COND"
TEXT_COND = "BINDWEAVE_TEXT_COND"
REFERENCES = "BINDWEAVE_REFERENCES"
REFERENCE_IMAGES = "BINDWEAVE_REFERENCE_IMAGES"  # the 1-4 images and masks, wired once (BindWeave References)

DTYPE_CHOICES = ("auto", *C.DTYPE_NAMES)
WIDGET_KINDS = ("combo", "int", "float", "string", "boolean")


@dataclass(frozen=True)
class In:
    """One input. ``kind`` is a widget kind (combo/int/float/string/boolean) or "socket"."""

    name: str
    kind: str
    tooltip: str
    type: str = ""  # io type of a socket: IMAGE, MASK, LATENT, BINDWEAVE_*
    default: Any = None
    min: Any = None
    max: Any = None
    step: Any = None
    options: tuple = ()
    files: tuple[str, ...] = ()  # combo of model files from these ComfyUI model folders
    smoke: tuple[str, ...] = ()  # extra built-in choices listed before the files
    directories: bool = False  # also list model directories found in models/bindweave/
    optional: bool = False
    multiline: bool = False
    seed: bool = False  # adds ComfyUI's "control after generate" widget
    setting: str = ""  # the generation setting (setting_bounds.SETTINGS) whose min/max the widget takes

    @property
    def is_widget(self) -> bool:
        return self.kind in WIDGET_KINDS


@dataclass(frozen=True)
class Out:
    type: str
    name: str
    tooltip: str


@dataclass(frozen=True)
class NodeSpec:
    node_id: str
    display_name: str
    category: str
    description: str
    inputs: tuple[In, ...]
    outputs: tuple[Out, ...]
    output_node: bool = False
    search_aliases: tuple[str, ...] = field(default_factory=tuple)

    def widgets(self) -> list[In]:
        """Widget inputs in the order ComfyUI's frontend stores their values (required, then optional)."""
        ordered = [i for i in self.inputs if not i.optional] + [i for i in self.inputs if i.optional]
        return [i for i in ordered if i.is_widget]


@dataclass(frozen=True)
class AutoPrecision:
    """What a loader's ``dtype: auto`` picks inside ComfyUI for one kind of model (``host.torch_dtype``
    asks ComfyUI about the device): a ComfyUI launch flag for this kind of model when one is given, else
    the official run's precision (``constants.OFFICIAL_DTYPE``, bf16) where the device supports it, else
    ``fallback``; fp32 on the CPU."""

    flag: str  # ComfyUI's per-model precision flags: --fp32-<flag>, --bf16-<flag>, --fp16-<flag>
    fallback: str  # on a GPU without bf16

    def tooltip(self, what: str) -> str:
        return (f"Precision of the {what}'s weights. auto: {C.OFFICIAL_DTYPE} (the official run's precision) on "
                f"devices that support it, else {self.fallback}; fp32 on CPU. ComfyUI's launch flags "
                f"--fp32-{self.flag}, --bf16-{self.flag} and --fp16-{self.flag} take precedence. The choice is "
                "logged.")


# By ComfyUI memory kind (host.wrap). fp16 has a far smaller range than bf16: only where bf16 is missing.
# VAEs stay out of fp16 altogether, as ComfyUI keeps its own VAEs (model_management.vae_dtype).
AUTO_PRECISION = {
    "dit": AutoPrecision("unet", "fp16"),
    "text_encoder": AutoPrecision("text-enc", "fp16"),
    "clip_vision": AutoPrecision("text-enc", "fp16"),
    "planner": AutoPrecision("text-enc", "fp16"),
    "vae": AutoPrecision("vae", "fp32"),
}


def _setting(name: str, setting: str, kind: str, tooltip: str, **extra: Any) -> In:
    """A number widget whose default, min and max are the setting's own (``setting_bounds``, the one
    validator); ``extra`` adds the step or replaces the default."""
    s = SETTINGS[setting]
    cast = float if kind == "float" else int
    fields = {"default": s.default, "step": s.multiple if s.multiple > 1 else None, **extra}
    return In(name, kind, tooltip, min=cast(s.min), max=cast(s.max), setting=setting, **fields)


def _dtype(what: str, kind: str) -> In:
    return In("dtype", "combo", AUTO_PRECISION[kind].tooltip(what), options=DTYPE_CHOICES, default="auto")


def _images(what: str) -> tuple[In, ...]:
    first = In("image_1", "socket", f"First reference image (a subject or a background) for the {what}. "
                                    "A batch counts as several references, in order.", type="IMAGE")
    rest = tuple(In(f"image_{k}", "socket", f"Reference image {k} (optional). At most 4 references in total; "
                                            "the order must match the other nodes.", type="IMAGE", optional=True)
                 for k in range(2, C.MAX_REFERENCES + 1))
    return (first,) + rest


def _reference_images(what: str) -> tuple[In, ...]:
    """The references input of Planner Encode and Reference Encode: BindWeave References, or (graphs saved
    before it) the node's own image sockets, kept so that old graphs load and run."""
    wired = In("reference_images", "socket", f"The reference images for the {what}, from BindWeave References "
                                             "(connect the same one to Planner Encode and Reference Encode).",
               type=REFERENCE_IMAGES, optional=True)
    legacy = tuple(In(f"image_{k}", "socket", f"Older wiring, kept for saved graphs: reference image {k}. Use "
                                              "reference_images instead.", type="IMAGE", optional=True)
                   for k in range(1, C.MAX_REFERENCES + 1))
    return (wired,) + legacy


def _masks(what: str) -> tuple[In, ...]:
    return tuple(In(f"mask_{k}", "socket", f"{what} for reference {k} (same size as the image; non-default). See "
                                           "invert_masks.", type="MASK", optional=True)
                 for k in range(1, C.MAX_REFERENCES + 1))


def _invert_masks(note: str = "") -> In:
    return In("invert_masks", "boolean", "ComfyUI's Load Image gives MASK = 1 where the image is transparent; on "
                                         "(default) turns that into 1 = subject. Off: masks already mark the subject."
                                         + (" " + note if note else ""), default=True, optional=True)


LOAD_DIT = NodeSpec(
    "BindWeaveDiTLoader", "Load BindWeave DiT", f"{CATEGORY}/loaders",
    "Loads the BindWeave diffusion transformer (Wan2.1-I2V-14B + the Qwen connector) from "
    "models/diffusion_models or models/unet (single file: bf16, fp8 scaled or GGUF) or a diffusers directory in "
    "models/bindweave. "
    "Kaleido-14B-S2V checkpoints load here too and switch the sampler to R-RoPE references.",
    (
        In("model_name", "combo", "The DiT checkpoint. The tiny smoke test choices need no download and make noise, "
                                  "for checking a workflow runs.", files=DIT_FOLDERS,
           smoke=(SMOKE_CHOICE, SMOKE_KALEIDO_CHOICE), directories=True),
        _dtype("DiT", "dit"),
        In("weight_format", "combo", "default: weights in the chosen precision (fp8 files are dequantised). "
                                     "fp8: keep the block weights in fp8 (e4m3) storage, about half the memory of bf16. "
                                     "fp8_fast: fp8 storage and fp8 matrix multiplies on GPUs of compute capability "
                                     "8.9+ (RTX 40xx, H100), approximate; elsewhere the same as fp8.",
           options=C.DIT_WEIGHT_FORMATS, default="default"),
        In("attention", "combo", "Attention kernel. sdpa (default, exact) lets PyTorch pick flash/cuDNN kernels; "
                                 "sage and flash need their packages and a CUDA GPU and fall back to sdpa otherwise; "
                                 "auto picks the fastest installed.", options=C.ATTENTION_BACKENDS,
           default="sdpa"),
        In("resident_blocks", "int", "Block offload. -1 (default): the whole DiT goes on the GPU when sampling, "
                                     "managed by ComfyUI. 0 or more: only this many of the transformer blocks (40 in "
                                     "the 14B model) stay on the GPU; the others stay in CPU RAM and are streamed in "
                                     "one by one while sampling (BindWeave Sampler, and KSampler / "
                                     "SamplerCustomAdvanced through BindWeave to MODEL). Same output, slower; for GPUs "
                                     "that cannot hold the model (e.g. 24 GB at 720p: fp8 with 16).",
           default=-1, min=-1, max=MAX_DIT_BLOCKS),
    ),
    (Out(DIT, "model", "The BindWeave (or Kaleido) DiT, managed by ComfyUI's model memory."),),
)

@dataclass(frozen=True)
class EncoderLoader:
    """One encoder loader node. The four (VAE, UMT5, CLIP vision, planner) differ only in these fields:
    ``spec`` is the node's interface; ``nodes/comfy_nodes.py`` defines one node class per row
    (``LoadVAE``, ``LoadTextEncoder``, ``LoadCLIPVision``, ``LoadPlanner``) on a shared base."""

    node_id: str
    display_name: str
    description: str
    file_input: str  # the combo of model files (plus the smoke model and models/bindweave directories)
    file_tooltip: str
    folders: tuple[str, ...]  # the ComfyUI model folders listed by the combo and searched for the choice
    what: str  # the model, as the dtype tooltip names it
    output: Out
    encoder: Callable[[], type[Encoder]]  # the bindweave_core encoder class (imported when a node runs)
    memory_kind: str  # what the model is to ComfyUI's memory manager (host.wrap) and to AUTO_PRECISION
    options: tuple[In, ...] = ()  # further inputs, passed on to the encoder's load() by name
    comfy_tokenizer: bool = False  # load() gets ComfyUI's bundled Qwen2.5 tokenizer folder (the planner)

    @property
    def spec(self) -> NodeSpec:
        files = In(self.file_input, "combo", self.file_tooltip, files=self.folders, smoke=(SMOKE_CHOICE,),
                   directories=True)
        return NodeSpec(self.node_id, self.display_name, f"{CATEGORY}/loaders", self.description,
                        (files, _dtype(self.what, self.memory_kind), *self.options), (self.output,))


# The encoder classes, imported only when a loader runs (ComfyUI starts without loading transformers' models).
def _wan_vae() -> type[Encoder]:
    from bindweave_core.encoders.vae import WanVAE
    return WanVAE


def _umt5() -> type[Encoder]:
    from bindweave_core.encoders.text import TextEncoder
    return TextEncoder


def _clip_vision() -> type[Encoder]:
    from bindweave_core.encoders.clip_vision import ClipVisionEncoder
    return ClipVisionEncoder


def _planner() -> type[Encoder]:
    from bindweave_core.encoders.planner import Planner
    return Planner


VAE_LOADER = EncoderLoader(
    "BindWeaveVAELoader", "Load BindWeave VAE",
    "Loads the Wan 2.1 VAE (wan_2.1_vae.safetensors in models/vae, or a diffusers vae directory).",
    "vae_name", "The Wan 2.1 VAE file.", ("vae",), "VAE", Out(VAE, "vae", "The Wan 2.1 VAE."), _wan_vae, "vae")
TEXT_ENCODER_LOADER = EncoderLoader(
    "BindWeaveTextEncoderLoader", "Load BindWeave UMT5",
    "Loads the UMT5-XXL text encoder (umt5_xxl_fp8_e4m3fn_scaled.safetensors, umt5_xxl_fp16.safetensors or "
    "umt5-xxl-enc-bf16.safetensors in models/text_encoders).",
    "text_encoder_name", "The UMT5-XXL encoder file.", ("text_encoders",), "text encoder",
    Out(TEXT_ENCODER, "text_encoder", "The UMT5-XXL encoder."), _umt5, "text_encoder",
    options=(In("tokenizer_dir", "string", "Only for files without a built-in tokenizer (e.g. umt5-xxl-enc-bf16): "
                                           "the folder of the google/umt5-xxl tokenizer. Leave empty otherwise.",
                default="", optional=True),))
CLIP_VISION_LOADER = EncoderLoader(
    "BindWeaveCLIPVisionLoader", "Load BindWeave CLIP Vision",
    "Loads the CLIP ViT-H/14 vision encoder (clip_vision_h.safetensors in models/clip_vision).",
    "clip_name", "The CLIP ViT-H/14 vision file.", ("clip_vision",), "CLIP vision encoder",
    Out(CLIP_VISION, "clip_vision", "The CLIP vision encoder."), _clip_vision, "clip_vision")
PLANNER_LOADER = EncoderLoader(
    "BindWeavePlannerLoader", "Load BindWeave Planner (Qwen2.5-VL)",
    "Loads the Qwen2.5-VL-7B planner that reads the prompt together with the reference images: "
    "qwen_2.5_vl_7b(_fp8_scaled).safetensors from models/text_encoders, or the Qwen2.5-VL-7B-Instruct "
    "directory in models/bindweave (which can also refine prompts).",
    "planner_name", "The Qwen2.5-VL-7B file or directory.", ("text_encoders",), "planner",
    Out(PLANNER, "planner", "The Qwen2.5-VL planner."), _planner, "planner",
    options=(In("weight_format", "combo", "fp8: keep the language model's linear weights in fp8 storage.",
                options=C.ENCODER_WEIGHT_FORMATS, default="default"),),
    comfy_tokenizer=True)
ENCODER_LOADERS: tuple[EncoderLoader, ...] = (VAE_LOADER, TEXT_ENCODER_LOADER, CLIP_VISION_LOADER, PLANNER_LOADER)
LOAD_VAE, LOAD_TEXT_ENCODER, LOAD_CLIP_VISION, LOAD_PLANNER = (row.spec for row in ENCODER_LOADERS)

REFERENCE_IMAGES_NODE = NodeSpec(
    "BindWeaveReferences", "BindWeave References", f"{CATEGORY}/conditioning",
    "The 1-4 reference images (subjects or a background) and their optional subject masks, wired once: connect "
    "its output to both Planner Encode and Reference Encode, so the planner and the reference encoding see the "
    "same images in the same order. A batched IMAGE counts as several references; a mask goes with the image "
    "of its number, and a mask without its image is refused.",
    (*_images("video"), *_masks("Optional subject mask"), _invert_masks()),
    (Out(REFERENCE_IMAGES, "reference_images", "The references, for Planner Encode and Reference Encode."),),
)

PLANNER_ENCODE = NodeSpec(
    "BindWeavePlannerEncode", "BindWeave Planner Encode", f"{CATEGORY}/conditioning",
    "Runs the planner on the prompt and the 1-4 reference images in one message (text first, then the images "
    "in order), once for the prompt and once for the negative prompt with the same images. Optionally rewrites "
    "a short prompt into a detailed one first; the prompt actually used comes out as text, to feed the UMT5 "
    "encode node.",
    (
        In("planner", "socket", "The planner from Load BindWeave Planner, or ComfyUI's Load CLIP with "
                                "qwen_2.5_vl_7b (type qwen_image; run by this pack's code on the same weights).",
           type=f"{PLANNER},CLIP"),
        In("prompt", "string", "What happens in the video: who, doing what, where.", multiline=True, default=""),
        In("negative_prompt", "string", "What to avoid. The default is the official planner negative prompt.",
           multiline=True, default=C.DEFAULT_PLANNER_NEGATIVE_PROMPT),
        *_reference_images("planner"),
        In("refine_prompt", "boolean", "Let the planner rewrite the prompt into a detailed single-scene "
                                       "description before encoding (needs a planner with its language-model head).",
           default=False),
        _setting("refine_seed", "refine_seed", "int", "Seed for prompt refinement; 0 = greedy (deterministic) "
                                                      "decoding.", default=0),
    ),
    (Out(PLANNER_COND, "planner_conditioning", "Planner states for the prompt and the negative prompt."),
     Out("STRING", "prompt", "The prompt the planner used (the refined one when refinement is on).")),
)

TEXT_ENCODE = NodeSpec(
    "BindWeaveTextEncode", "BindWeave UMT5 Encode", f"{CATEGORY}/conditioning",
    "Encodes the prompt and the negative prompt with UMT5-XXL (512 tokens, zero past the text).",
    (
        In("text_encoder", "socket", "The encoder from Load BindWeave UMT5, or ComfyUI's Load CLIP with a "
                                     "umt5_xxl file (type wan; run by this pack's code on the same weights).",
           type=f"{TEXT_ENCODER},CLIP"),
        In("prompt", "string", "The prompt: connect the planner's prompt output to use the same (or refined) text.",
           multiline=True, default=""),
        In("negative_prompt", "string", "What to avoid. The default is the official negative prompt.",
           multiline=True, default=C.DEFAULT_NEGATIVE_PROMPT),
    ),
    (Out(TEXT_COND, "text_conditioning", "UMT5 states for the prompt and the negative prompt."),),
)

REFERENCE_ENCODE = NodeSpec(
    "BindWeaveReferenceEncode", "BindWeave Reference Encode", f"{CATEGORY}/conditioning",
    "Prepares the 1-4 reference images as the model sees them: each is letterboxed (never upscaled) on a canvas "
    "of the video size, encoded by CLIP (squashed to 224) and by the VAE into one of the 4 reference slots; the "
    "all-zero video condition is encoded for the chosen length. Also outputs the letterboxed images and masks "
    "so you can see what the model sees. Kaleido mode letterboxes on white and keeps clean reference latents.",
    (
        In("vae", "socket", "The VAE from Load BindWeave VAE, or ComfyUI's own Load VAE with the Wan 2.1 VAE (run "
                            "by this pack's code on the same weights: the same numbers).", type=f"{VAE},VAE"),
        *_reference_images("reference encoding"),
        _setting("width", "width", "int", "Video width in pixels (multiple of 16)."),
        _setting("height", "height", "int", "Video height in pixels (multiple of 16)."),
        _setting("length", "num_frames", "int", "Number of frames (4k+1: 81 = 5 s at 16 fps)."),
        In("mode", "combo", "bindweave: the 4 temporal reference slots of BindWeave. kaleido: R-RoPE sequence "
                            "references for Kaleido-14B-S2V checkpoints. Must match the loaded DiT.",
           options=("bindweave", "kaleido"), default="bindweave"),
        In("mask_mode", "combo", "rectangle (official): the mask is the letterbox rectangle. alpha: RGBA cut-outs "
                                 "mark the subject with their alpha, composited on black (non-default). In kaleido "
                                 "mode everything outside the subject is painted white instead.",
           options=C.MASK_MODES, default="rectangle"),
        In("clip_vision", "socket", "The CLIP vision encoder (needed in bindweave mode): Load BindWeave CLIP Vision, "
                                    "or ComfyUI's Load CLIP Vision with clip_vision_h (run by this pack's code with "
                                    "the official squash to 224, not ComfyUI's centre crop).",
           type=f"{CLIP_VISION},CLIP_VISION", optional=True),
        *_masks("Older wiring, kept for saved graphs: subject mask"),
        _invert_masks("(older wiring; BindWeave References has its own)"),
    ),
    (Out(REFERENCES, "references", "Reference conditioning for the sampler."),
     Out("IMAGE", "letterboxed", "The references as the model sees them (letterboxed canvases)."),
     Out("MASK", "masks", "The reference masks (1 = reference pixels).")),
)

SAMPLER = NodeSpec(
    "BindWeaveSampler", "BindWeave Sampler", f"{CATEGORY}/sampling",
    "Denoises a video with the official sampler (UniPC, 50 steps, shift 3, guidance 5). The reference layout "
    "follows the loaded DiT: temporal slots for BindWeave, R-RoPE positions for Kaleido. Guidance 1.0 (e.g. with "
    "the lightx2v step-distill LoRA: rf-euler, 4 steps, shift 5) skips the negative pass.",
    (
        In("model", "socket", "The DiT (optionally with LoRAs).", type=DIT),
        In("text_conditioning", "socket", "From BindWeave UMT5 Encode.", type=TEXT_COND),
        In("references", "socket", "From BindWeave Reference Encode.", type=REFERENCES),
        _setting("seed", "seed", "int", "Noise seed (official: 1234; noise is drawn in bf16 on the CPU as the "
                                        "official run does, so the same seed gives the same video on any GPU).",
                 seed=True),
        _setting("steps", "steps", "int", "Denoising steps (official: 50; step-distilled LoRAs: 4-8)."),
        _setting("guidance", "guidance", "float", "Classifier-free guidance scale (official: 5.0; Kaleido: 6.0). 1.0 "
                                                  "disables the negative branch.", step=0.1),
        _setting("shift", "shift", "float", "Flow shift of the noise schedule (official: 3.0).", step=0.1),
        In("sampler", "combo", "unipc: BindWeave's official UniPC multistep solver on the "
                               "official grid. unipc-diffusers: the same on the installed diffusers' grid (differs "
                               "from 0.37 on). euler: flow-matching Euler. rf-euler: Euler on an evenly spaced, "
                               "shifted grid: Kaleido's official sampler (shift 7) and the lightx2v step-distill "
                               "LoRA's (4 steps, shift 5).",
           options=SAMPLERS, default="unipc"),
        In("cfg_batch", "combo", "auto: run prompt and negative prompt in one batch when memory allows. "
                                 "separate: two calls per step (less memory).",
           options=C.CFG_BATCH_MODES, default="auto"),
        _setting("step_cache", "step_cache", "float",
                 "Step caching (EasyCache): skip a DiT evaluation while the model's output is predicted to change "
                 "less than this (accumulated relative change), reusing the last one. 0 (default): off, exact. "
                 f"{C.DEFAULT_STEP_CACHE}: the authors' value for Wan 2.1 (about 2x faster there); higher is "
                 "faster and less faithful. The number of evaluations saved is logged.", step=0.01),
        In("planner_conditioning", "socket", "From BindWeave Planner Encode (required by BindWeave models, unused "
                                             "by Kaleido).", type=PLANNER_COND, optional=True),
    ),
    (Out("LATENT", "samples", "The denoised video latents in the VAE's raw space, ComfyUI's convention (VAE Decode "
                              "takes them too)."),),
)

DECODE = NodeSpec(
    "BindWeaveDecode", "BindWeave Decode", f"{CATEGORY}/sampling",
    "Decodes the latents into frames for ComfyUI's Create Video / Save Video nodes.",
    (
        In("vae", "socket", "The VAE from Load BindWeave VAE, or ComfyUI's own Load VAE with the Wan 2.1 VAE (run "
                            "by this pack's code on the same weights).", type=f"{VAE},VAE"),
        In("samples", "socket", "Latents from the BindWeave Sampler or a KSampler on the BindWeave MODEL.",
           type="LATENT"),
        In("tiled", "boolean", "Decode in spatial tiles to save memory (slightly different at tile seams).",
           default=False),
        _setting("fps", "fps", "float", "Frame rate passed on to Create Video (the model was trained at 16 fps).",
                 default=float(C.DEFAULT_FPS), step=1.0),
    ),
    (Out("IMAGE", "frames", "The video frames [frames, height, width, 3] in 0..1."),
     Out("FLOAT", "fps", "The frame rate.")),
)

LORA = NodeSpec(
    "BindWeaveLoraLoader", "BindWeave LoRA", f"{CATEGORY}/loaders",
    "Applies a LoRA from models/loras to the DiT (LoRAs from the bundled trainer, and Wan 2.1 LoRAs in the "
    "diffusers, original or kohya layouts). ComfyUI patches the weights when the model is loaded.",
    (In("model", "socket", "The DiT to patch.", type=DIT),
     In("lora_name", "combo", "The LoRA file.", files=("loras",)),
     In("strength", "float", "LoRA strength (1.0 = as trained).", default=1.0, min=-10.0, max=10.0, step=0.01)),
    (Out(DIT, "model", "The DiT with the LoRA applied."),),
)

# ------------------------------------------------------------------------------------------ native route
NATIVE_MODEL = NodeSpec(
    "BindWeaveNativeModel", "BindWeave to MODEL", f"{CATEGORY}/native",
    "The BindWeave / Kaleido DiT as a native ComfyUI MODEL (flow sampling, shift 3 for BindWeave and 7 for "
    "Kaleido, Wan 2.1 latent format), for KSampler, SamplerCustomAdvanced, LoraLoaderModelOnly (original Wan, "
    "kohya and trainer LoRAs), ModelSamplingSD3, TorchCompileModel and step caches such as EasyCache. The DiT "
    "runs exactly as in the BindWeave Sampler.",
    (In("model", "socket", "The DiT from Load BindWeave DiT (optionally with BindWeave LoRAs). Its resident_blocks "
                           "applies here too: with 0 or more, native samplers run the DiT with that many blocks on "
                           "the GPU and stream the others (the same latents, slower).", type=DIT),),
    (Out("MODEL", "MODEL", "A native MODEL for ComfyUI's samplers and model patches."),),
)

NATIVE_CONDITIONING = NodeSpec(
    "BindWeaveConditioning", "BindWeave Conditioning", f"{CATEGORY}/native",
    "Native positive / negative CONDITIONING for KSampler: the UMT5 states, with the planner states, CLIP tokens "
    "and reference slots (BindWeave) or the reference latents (Kaleido) attached; plus an empty video LATENT "
    "of the size Reference Encode was set to. Use the negative with the CFG of the official settings (5.0, "
    "Kaleido 6.0).",
    (In("text_conditioning", "socket", "From BindWeave UMT5 Encode.", type=TEXT_COND),
     In("references", "socket", "From BindWeave Reference Encode.", type=REFERENCES),
     In("planner_conditioning", "socket", "From BindWeave Planner Encode (required by BindWeave models, unused "
                                          "by Kaleido).", type=PLANNER_COND, optional=True)),
    (Out("CONDITIONING", "positive", "The prompt's conditioning."),
     Out("CONDITIONING", "negative", "The negative prompt's conditioning (with the same references, as the "
                                     "official sampler does)."),
     Out("LATENT", "latent", "Empty video latents [1, 16, (length - 1) / 4 + 1, height / 8, width / 8].")),
)

SIGMAS = NodeSpec(
    "BindWeaveSigmas", "BindWeave Sigmas", f"{CATEGORY}/native",
    "The noise levels of the official samplers, as SIGMAS for SamplerCustomAdvanced: euler with these sigmas "
    "equals the BindWeave Sampler's euler. (KSampler's own schedulers space the steps differently.)",
    (_setting("steps", "steps", "int", "Denoising steps."),
     _setting("shift", "shift", "float", "Flow shift (official: 3.0; Kaleido: 7.0).", step=0.1),
     In("schedule", "combo", "Whose schedule: unipc (BindWeave's official), euler, rf-euler (Kaleido's).",
        options=SAMPLERS, default="euler")),
    (Out("SIGMAS", "sigmas", "steps + 1 noise levels from 1 to 0."),),
)

NOISE = NodeSpec(
    "BindWeaveNoise", "BindWeave Noise", f"{CATEGORY}/native",
    "The official start noise as NOISE for SamplerCustomAdvanced: drawn in bf16 on the CPU as the official run "
    "draws it, the same noise the BindWeave Sampler uses for this seed (ComfyUI's RandomNoise draws float32 "
    "values, another video).",
    (_setting("noise_seed", "seed", "int", "Noise seed (official: 1234).", seed=True),),
    (Out("NOISE", "noise", "Noise for SamplerCustomAdvanced."),),
)

# ------------------------------------------------------------------------------------------ evaluation
EVALUATE = NodeSpec(
    "BindWeaveEvaluate", "BindWeave Evaluate", f"{CATEGORY}/evaluation",
    "Scores any video against its reference images with local models: CLIP-I per reference (cosine of CLIP "
    "ViT-H class-token features, frames and references squashed to 224), optional DINO-I and ArcFace face "
    "similarity, VBench's subject consistency and temporal flickering, and optical-flow motion; per frame, "
    "overall and per context window. Outputs a plot of the per-frame curves (also shown on the node) and the "
    "report. These are not OpenS2V-Eval scores (see docs/evaluation.md).",
    (
        In("frames", "socket", "The video frames (from BindWeave Decode, a Load Video node, any IMAGE batch).",
           type="IMAGE"),
        In("clip_vision", "socket", "The CLIP ViT-H/14 vision encoder from Load BindWeave CLIP Vision.",
           type=CLIP_VISION),
        *(In(f"image_{k}", "socket", f"Reference image {k}" + (" (a batch counts as several references)." if k == 1
                                                                 else " (optional)."),
             type="IMAGE", optional=k > 1) for k in range(1, C.MAX_REFERENCES + 1)),
        In("samples", "int", "Frames sampled evenly (first to last) for the similarity metrics and subject "
                             "consistency; 0 = every frame. Flickering uses every frame.",
           default=32, min=0, max=100000),
        In("regions", "boolean", "Also score the best-matching half-size region of each frame (the whole frame and "
                                 "a 3 x 3 grid of crops: 10 times the CLIP work).", default=False),
        In("prompt", "string", "The prompt, recorded in the report only (no text score is computed).",
           multiline=True, default="", optional=True),
        In("windows", "string", "Context windows as [start, end) frame ranges, e.g. '0:33, 24:57': adds per-window "
                                "means and draws the boundaries. Empty: none.", default="", optional=True),
        In("dino_dir", "string", "Optional: a transformers DINOv2 folder (e.g. facebook/dinov2-base) for DINO-I; "
                                 "subject consistency then uses DINOv2 as VBench does. Empty: skipped.",
           default="", optional=True),
        In("face_model_dir", "string", "Optional: an InsightFace model pack folder (e.g. buffalo_l) for ArcFace face "
                                       "similarity; needs the insightface and onnxruntime packages. The model "
                                       "packs are for non-commercial use only. Empty: skipped.",
           default="", optional=True),
    ),
    (Out("IMAGE", "plot", "The per-frame curves with the context windows."),
     Out("STRING", "summary", "The overall values, window means and skipped metrics, as text."),
     Out("STRING", "report_json", "The whole report as JSON (schema in docs/evaluation.md).")),
    output_node=True,
)

ALL_SPECS: tuple[NodeSpec, ...] = (LOAD_DIT, LOAD_VAE, LOAD_TEXT_ENCODER, LOAD_CLIP_VISION, LOAD_PLANNER,
                                   PLANNER_ENCODE, TEXT_ENCODE, REFERENCE_ENCODE, SAMPLER, DECODE, LORA,
                                   NATIVE_MODEL, NATIVE_CONDITIONING, SIGMAS, NOISE, REFERENCE_IMAGES_NODE, EVALUATE)
SPECS = {s.node_id: s for s in ALL_SPECS}

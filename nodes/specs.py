"""The BindWeave nodes' interface, described without ComfyUI.

Every node's id, inputs (with their tooltips and defaults), outputs and description live here, as
plain data. ``nodes/comfy_nodes.py`` turns them into ComfyUI V3 schemas; the tests read them
without a ComfyUI install (e.g. to check the example workflows' widgets).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bindweave_core import constants as C
from bindweave_core.config import get_preset
from bindweave_core.sampling import SAMPLERS

CATEGORY = "BindWeave"
SMOKE_CHOICE = "tiny smoke test (random weights)"
SMOKE_KALEIDO_CHOICE = "tiny smoke test, Kaleido R-RoPE (random weights)"
MODEL_FOLDER = "bindweave"  # models/bindweave/: Hugging Face directories (Qwen2.5-VL, BindWeave, Kaleido)
GGUF_FOLDER = "bindweave_gguf"  # .gguf files in models/unet/ and models/diffusion_models/ (host.register_model_folder)
DIT_FOLDERS = ("diffusion_models", GGUF_FOLDER)
MAX_RESOLUTION = 8192
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


def _dtype(what: str) -> In:
    return In("dtype", "combo", f"Precision of the {what}'s weights. auto: bf16 on GPUs that support it, else fp16; "
                                "fp32 on CPU.", options=DTYPE_CHOICES, default="auto")


def _images(what: str) -> tuple[In, ...]:
    first = In("image_1", "socket", f"First reference image (a subject or a background) for the {what}. "
                                    "A batch counts as several references, in order.", type="IMAGE")
    rest = tuple(In(f"image_{k}", "socket", f"Reference image {k} (optional). At most 4 references in total; "
                                            "the order must match the other nodes.", type="IMAGE", optional=True)
                 for k in range(2, C.MAX_REFERENCES + 1))
    return (first,) + rest


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
        _dtype("DiT"),
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
                                     "one by one while sampling. Same output, slower; for GPUs that cannot hold the "
                                     "model (e.g. 24 GB at 720p: fp8 with 16).",
           default=-1, min=-1, max=MAX_DIT_BLOCKS),
    ),
    (Out(DIT, "model", "The BindWeave (or Kaleido) DiT, managed by ComfyUI's model memory."),),
)

@dataclass(frozen=True)
class EncoderLoader:
    """One encoder loader node. The four (VAE, UMT5, CLIP vision, planner) differ only in these fields:
    ``spec`` is the node's interface and ``nodes/comfy_nodes.py`` builds one node class per row."""

    class_name: str  # the node's Python class in comfy_nodes
    node_id: str
    display_name: str
    description: str
    file_input: str  # the combo of model files (plus the smoke model and models/bindweave directories)
    file_tooltip: str
    folders: tuple[str, ...]  # the ComfyUI model folders listed by the combo and searched for the choice
    what: str  # the model, as the dtype tooltip names it
    output: Out
    encoder: str  # the bindweave_core encoder class, "module:Class" (imported when a node runs)
    memory_kind: str  # what the model is to ComfyUI's memory manager (host.wrap)
    dtype_kind: str  # whose ComfyUI default "auto" means (host.torch_dtype)
    options: tuple[In, ...] = ()  # further inputs, passed on to the encoder's load() by name
    comfy_tokenizer: bool = False  # load() gets ComfyUI's bundled Qwen2.5 tokenizer folder (the planner)

    @property
    def spec(self) -> NodeSpec:
        files = In(self.file_input, "combo", self.file_tooltip, files=self.folders, smoke=(SMOKE_CHOICE,),
                   directories=True)
        return NodeSpec(self.node_id, self.display_name, f"{CATEGORY}/loaders", self.description,
                        (files, _dtype(self.what), *self.options), (self.output,))


ENCODER_LOADERS: tuple[EncoderLoader, ...] = (
    EncoderLoader(
        "LoadVAE", "BindWeaveVAELoader", "Load BindWeave VAE",
        "Loads the Wan 2.1 VAE (wan_2.1_vae.safetensors in models/vae, or a diffusers vae directory).",
        "vae_name", "The Wan 2.1 VAE file.", ("vae",), "VAE", Out(VAE, "vae", "The Wan 2.1 VAE."),
        "bindweave_core.encoders.vae:WanVAE", "vae", "vae"),
    EncoderLoader(
        "LoadTextEncoder", "BindWeaveTextEncoderLoader", "Load BindWeave UMT5",
        "Loads the UMT5-XXL text encoder (umt5_xxl_fp8_e4m3fn_scaled.safetensors, umt5_xxl_fp16.safetensors or "
        "umt5-xxl-enc-bf16.safetensors in models/text_encoders).",
        "text_encoder_name", "The UMT5-XXL encoder file.", ("text_encoders",), "text encoder",
        Out(TEXT_ENCODER, "text_encoder", "The UMT5-XXL encoder."),
        "bindweave_core.encoders.text:TextEncoder", "text_encoder", "text",
        options=(In("tokenizer_dir", "string", "Only for files without a built-in tokenizer (e.g. umt5-xxl-enc-bf16): "
                                               "the folder of the google/umt5-xxl tokenizer. Leave empty otherwise.",
                    default="", optional=True),)),
    EncoderLoader(
        "LoadCLIPVision", "BindWeaveCLIPVisionLoader", "Load BindWeave CLIP Vision",
        "Loads the CLIP ViT-H/14 vision encoder (clip_vision_h.safetensors in models/clip_vision).",
        "clip_name", "The CLIP ViT-H/14 vision file.", ("clip_vision",), "CLIP vision encoder",
        Out(CLIP_VISION, "clip_vision", "The CLIP vision encoder."),
        "bindweave_core.encoders.clip_vision:ClipVisionEncoder", "clip_vision", "text"),
    EncoderLoader(
        "LoadPlanner", "BindWeavePlannerLoader", "Load BindWeave Planner (Qwen2.5-VL)",
        "Loads the Qwen2.5-VL-7B planner that reads the prompt together with the reference images: "
        "qwen_2.5_vl_7b(_fp8_scaled).safetensors from models/text_encoders, or the Qwen2.5-VL-7B-Instruct "
        "directory in models/bindweave (which can also refine prompts).",
        "planner_name", "The Qwen2.5-VL-7B file or directory.", ("text_encoders",), "planner",
        Out(PLANNER, "planner", "The Qwen2.5-VL planner."),
        "bindweave_core.encoders.planner:Planner", "planner", "text",
        options=(In("weight_format", "combo", "fp8: keep the language model's linear weights in fp8 storage.",
                    options=C.ENCODER_WEIGHT_FORMATS, default="default"),),
        comfy_tokenizer=True),
)
LOAD_VAE, LOAD_TEXT_ENCODER, LOAD_CLIP_VISION, LOAD_PLANNER = (row.spec for row in ENCODER_LOADERS)

PLANNER_ENCODE = NodeSpec(
    "BindWeavePlannerEncode", "BindWeave Planner Encode", f"{CATEGORY}/conditioning",
    "Runs the planner on the prompt and the 1-4 reference images in one message (text first, then the images "
    "in order), once for the prompt and once for the negative prompt with the same images. Optionally rewrites "
    "a short prompt into a detailed one first; the prompt actually used comes out as text, to feed the UMT5 "
    "encode node.",
    (
        In("planner", "socket", "The planner from Load BindWeave Planner.", type=PLANNER),
        In("prompt", "string", "What happens in the video: who, doing what, where.", multiline=True, default=""),
        In("negative_prompt", "string", "What to avoid. The default is the official planner negative prompt.",
           multiline=True, default=C.DEFAULT_PLANNER_NEGATIVE_PROMPT),
        *_images("planner"),
        In("refine_prompt", "boolean", "Let the planner rewrite the prompt into a detailed single-scene "
                                       "description before encoding (needs a planner with its language-model head).",
           default=False),
        In("refine_seed", "int", "Seed for prompt refinement; 0 = greedy (deterministic) decoding.", default=0,
           min=0, max=2**31 - 1),
    ),
    (Out(PLANNER_COND, "planner_conditioning", "Planner states for the prompt and the negative prompt."),
     Out("STRING", "prompt", "The prompt the planner used (the refined one when refinement is on).")),
)

TEXT_ENCODE = NodeSpec(
    "BindWeaveTextEncode", "BindWeave UMT5 Encode", f"{CATEGORY}/conditioning",
    "Encodes the prompt and the negative prompt with UMT5-XXL (512 tokens, zero past the text).",
    (
        In("text_encoder", "socket", "The encoder from Load BindWeave UMT5.", type=TEXT_ENCODER),
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
        *_images("references"),
        In("width", "int", "Video width in pixels (multiple of 16).", default=C.DEFAULT_WIDTH, min=16,
           max=MAX_RESOLUTION, step=16),
        In("height", "int", "Video height in pixels (multiple of 16).", default=C.DEFAULT_HEIGHT, min=16,
           max=MAX_RESOLUTION, step=16),
        In("length", "int", "Number of frames (4k+1: 81 = 5 s at 16 fps).", default=C.DEFAULT_FRAMES, min=1,
           max=1025, step=4),
        In("mode", "combo", "bindweave: the 4 temporal reference slots of BindWeave. kaleido: R-RoPE sequence "
                            "references for Kaleido-14B-S2V checkpoints. Must match the loaded DiT.",
           options=("bindweave", "kaleido"), default="bindweave"),
        In("mask_mode", "combo", "rectangle (official): the mask is the letterbox rectangle. alpha: RGBA cut-outs "
                                 "mark the subject with their alpha, composited on black (non-default). In kaleido "
                                 "mode everything outside the subject is painted white instead.",
           options=C.MASK_MODES, default="rectangle"),
        In("clip_vision", "socket", "The CLIP vision encoder (needed in bindweave mode).", type=CLIP_VISION,
           optional=True),
        *(In(f"mask_{k}", "socket", f"Optional subject mask for reference {k} (same size as the image; "
                                    "non-default). See invert_masks.", type="MASK", optional=True)
          for k in range(1, C.MAX_REFERENCES + 1)),
        In("invert_masks", "boolean", "ComfyUI's Load Image gives MASK = 1 where the image is transparent; on "
                                      "(default) turns that into 1 = subject. Off: masks already mark the subject.",
           default=True, optional=True),
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
        In("seed", "int", "Noise seed (official: 1234; noise is drawn in bf16 on the CPU as the official run does, "
                          "so the same seed gives the same video on any GPU).",
           default=C.DEFAULT_SEED, min=0, max=2**63 - 1, seed=True),
        In("steps", "int", "Denoising steps (official: 50; step-distilled LoRAs: 4-8).", default=C.DEFAULT_STEPS,
           min=1, max=1000),
        In("guidance", "float", "Classifier-free guidance scale (official: 5.0; Kaleido: 6.0). 1.0 disables the "
                                "negative branch.", default=C.DEFAULT_GUIDANCE, min=1.0, max=30.0, step=0.1),
        In("shift", "float", "Flow shift of the noise schedule (official: 3.0).", default=C.DEFAULT_SHIFT, min=0.1,
           max=20.0, step=0.1),
        In("sampler", "combo", "unipc: BindWeave's official UniPC multistep solver on the "
                               "official grid. unipc-diffusers: the same on the installed diffusers' grid (differs "
                               "from 0.37 on). euler: flow-matching Euler. rf-euler: Euler on an evenly spaced, "
                               "shifted grid: Kaleido's official sampler (shift 7) and the lightx2v step-distill "
                               "LoRA's (4 steps, shift 5).",
           options=SAMPLERS, default="unipc"),
        In("cfg_batch", "combo", "auto: run prompt and negative prompt in one batch when memory allows. "
                                 "separate: two calls per step (less memory).",
           options=C.CFG_BATCH_MODES, default="auto"),
        In("step_cache", "float", "Step caching (EasyCache): skip a DiT evaluation while the model's output is "
                                  "predicted to change less than this (accumulated relative change), reusing the "
                                  f"last one. 0 (default): off, exact. {C.DEFAULT_STEP_CACHE}: the authors' value "
                                  "for Wan 2.1 (about 2x faster there); higher is faster and less faithful. The "
                                  "number of evaluations saved is logged.",
           default=0.0, min=0.0, max=1.0, step=0.01),
        In("context_frames", "int", "Context windows for long videos: the window length in frames (4k+1, e.g. 81, "
                                    "the length the models were trained on). Each window is denoised as an "
                                    "ordinary clip with the full references and the windows are fused at every "
                                    "step. 0 (default): off, the whole video is one clip (exactly as before).",
           default=0, min=0, max=C.MAX_CONTEXT_FRAMES, step=4),
        In("context_overlap", "int", "Frames shared by neighbouring windows (a multiple of 4).",
           default=C.DEFAULT_CONTEXT_OVERLAP, min=0, max=C.MAX_CONTEXT_FRAMES, step=4),
        In("context_schedule", "combo", "Window placement, as ComfyUI's context-window nodes name it. "
                                        "standard_static: windows every (length - overlap) frames, the last one "
                                        "ending at the last frame. batched: back to back, no overlap.",
           options=C.CONTEXT_SCHEDULES, default=C.DEFAULT_CONTEXT_SCHEDULE),
        In("context_fuse", "combo", "How overlapping windows are weighted: pyramid (ComfyUI's default: more weight "
                                    "to a window's middle), flat, overlap-linear (ramps over the overlap).",
           options=C.CONTEXT_FUSE_METHODS, default=C.DEFAULT_CONTEXT_FUSE),
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
        In("vae", "socket", "The VAE from Load BindWeave VAE.", type=VAE),
        In("samples", "socket", "Latents from the BindWeave Sampler or a KSampler on the BindWeave MODEL.",
           type="LATENT"),
        In("tiled", "boolean", "Decode in spatial tiles to save memory (slightly different at tile seams).",
           default=False),
        In("fps", "float", "Frame rate passed on to Create Video (the model was trained at 16 fps).",
           default=float(C.DEFAULT_FPS), min=1.0, max=120.0, step=1.0),
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
    (In("model", "socket", "The DiT from Load BindWeave DiT (optionally with BindWeave LoRAs). Leave its "
                           "resident_blocks at -1: native samplers load the model through ComfyUI.", type=DIT),),
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
    (In("steps", "int", "Denoising steps.", default=C.DEFAULT_STEPS, min=1, max=1000),
     In("shift", "float", "Flow shift (official: 3.0; Kaleido: 7.0).", default=C.DEFAULT_SHIFT, min=0.1, max=20.0,
        step=0.1),
     In("schedule", "combo", "Whose schedule: unipc (BindWeave's official), euler, rf-euler (Kaleido's).",
        options=SAMPLERS, default="euler")),
    (Out("SIGMAS", "sigmas", "steps + 1 noise levels from 1 to 0."),),
)

NOISE = NodeSpec(
    "BindWeaveNoise", "BindWeave Noise", f"{CATEGORY}/native",
    "The official start noise as NOISE for SamplerCustomAdvanced: drawn in bf16 on the CPU as the official run "
    "draws it, the same noise the BindWeave Sampler uses for this seed (ComfyUI's RandomNoise draws float32 "
    "values, another video).",
    (In("noise_seed", "int", "Noise seed (official: 1234).", default=C.DEFAULT_SEED, min=0, max=2**63 - 1,
        seed=True),),
    (Out("NOISE", "noise", "Noise for SamplerCustomAdvanced."),),
)

ALL_SPECS: tuple[NodeSpec, ...] = (LOAD_DIT, LOAD_VAE, LOAD_TEXT_ENCODER, LOAD_CLIP_VISION, LOAD_PLANNER,
                                   PLANNER_ENCODE, TEXT_ENCODE, REFERENCE_ENCODE, SAMPLER, DECODE, LORA,
                                   NATIVE_MODEL, NATIVE_CONDITIONING, SIGMAS, NOISE)
SPECS = {s.node_id: s for s in ALL_SPECS}

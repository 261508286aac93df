"""Single source of truth for the numbers the released BindWeave-14B weights expect.

Every value here comes from ``shared/spec/bindweave-inference.md`` (section in brackets).
Other modules import these names instead of repeating the numbers.
"""

from __future__ import annotations

# --- reference conditioning [5, 6, 8] --------------------------------------------------------
MAX_REFERENCES = 4  # at most 4 reference images per generation
NUM_REF_SLOTS = 4  # temporal slots reserved in front of the video latents, always 4
CLIP_TOKENS_PER_REF = 257  # CLIP ViT-H/14 penultimate layer: 1 cls + 16x16 patches
CLIP_CONTEXT_TOKENS = NUM_REF_SLOTS * CLIP_TOKENS_PER_REF  # 1028: refs + zero padding
IMAGE_KV_TOKENS = CLIP_TOKENS_PER_REF  # quirk [7]: the image K/V stream sees the first 257 only
CLIP_IMAGE_SIZE = 224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# torchvision v2.Resize on a float tensor antialiases only from 0.17; the official environment points to
# torchvision 0.16, i.e. none (evidence in docs/fidelity.md). Antialiased is an explicit option.
CLIP_RESIZE_ANTIALIAS = False
SLOT_MASK_CHANNELS = 4  # [mask, 0, 0, 0] in front of the 16 latent channels of a slot
LATENT_CHANNELS = 16
CONDITION_CHANNELS = SLOT_MASK_CHANNELS + LATENT_CHANNELS  # 20

# --- text [3, 4] ------------------------------------------------------------------------------
TEXT_LEN = 512  # UMT5 positions, zero past the real tokens
# The longest prompt accepted, in characters (checked before any model runs: a 1 MiB prompt kept the planner
# busy for minutes). UMT5 reads only the first TEXT_LEN tokens (about 2000 characters of English); the
# planner reads all of it, at a cost that grows with the square of its length.
MAX_PROMPT_CHARACTERS = 8192
PLANNER_DIM = 3584  # Qwen2.5-VL-7B hidden size, input width of the connector

DEFAULT_NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, "
    "images, static, overall gray, worst quality, low quality, JPEG compression residue, ugly, "
    "incomplete, extra fingers, poorly drawn hands, poorly drawn faces, deformed, disfigured, "
    "misshapen limbs, fused fingers, still picture, messy background, three legs, many people "
    "in the background, walking backwards, split screen, divided frame, frame split, multiple "
    "parts, separated"
)
# The planner's negative prompt is the UMT5 one plus a motion clause (no space after the comma).
PLANNER_NEGATIVE_SUFFIX = ",motionless, frozen, still image, no movement, stationary, unmoving"
DEFAULT_PLANNER_NEGATIVE_PROMPT = DEFAULT_NEGATIVE_PROMPT + PLANNER_NEGATIVE_SUFFIX

# --- planner image pre-resize [2] -------------------------------------------------------------
PLANNER_SMALL_IMAGE_PIXELS = 1280 * 720
PLANNER_SMALL_IMAGE_SCALE = 0.75
PLANNER_LARGE_IMAGE_SCALE = 0.3

# --- video geometry [intro, 8, 11] ------------------------------------------------------------
VAE_TEMPORAL_FACTOR = 4
VAE_SPATIAL_FACTOR = 8
PATCH_SIZE = (1, 2, 2)
SIZE_MULTIPLE = 16  # width/height must be multiples of 16 (VAE x8, then 2x2 patches)
MIN_REFERENCE_SIDE = 16  # a smaller reference image (e.g. 1x1) is less than one DiT patch: refused
ROPE_POSITIONS = 1024  # the official rotary tables cover 1024 positions per axis (Wan's rope_max_seq_len)
QK_NORM = "rms_norm_across_heads"  # Wan's query/key RMSNorm over all heads (the only one diffusers builds)
DEFAULT_WIDTH = 1280
DEFAULT_HEIGHT = 720
DEFAULT_FRAMES = 81
DEFAULT_FPS = 16
# H.264 output: libx264's thread count decides its output bytes, and by default it follows the machine's
# core count; a fixed count makes the same frames the same file on every machine (benchmarks/mp4_encode.py).
MP4_CRF = 18
MP4_ENCODER_THREADS = 4

# --- sampling [10] ----------------------------------------------------------------------------
DEFAULT_STEPS = 50
DEFAULT_SHIFT = 3.0
DEFAULT_GUIDANCE = 5.0
DEFAULT_SEED = 1234  # the official default (Megatron's --seed; the inference script passes none)
NUM_TRAIN_TIMESTEPS = 1000
SAMPLERS = ("unipc", "unipc-diffusers", "euler", "rf-euler")  # bindweave_core.sampling
DEFAULT_SAMPLER = "unipc"  # BindWeave's official sampler (spec section 9)
# EasyCache's published threshold for Wan 2.1 (T2V and I2V 14B): the ``--thresh`` default of
# H-EmbodVis/EasyCache EasyCache4Wan2.1/easycache_generate.py (commit 51278044). Off unless asked for.
DEFAULT_STEP_CACHE = 0.05

# --- option lists: defined once, imported by the CLI, the node specs and the training config ------------
DTYPE_NAMES = ("bf16", "fp16", "fp32")  # torch dtypes by name: bindweave_core.dtypes.torch_dtype
DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}  # torch's own names (training config)
# The precision of every model in the official run (configs/inference/inference_model_s2v.json: DiT, UMT5,
# image encoder and VAE "dtype": "bf16"; configs/feature_extract/model.json: the Qwen2.5-VL planner, bf16).
OFFICIAL_DTYPE = "bf16"
DIT_WEIGHT_FORMATS = ("default", "fp8", "fp8_fast")
ENCODER_WEIGHT_FORMATS = ("default", "fp8")
ATTENTION_BACKENDS = ("auto", "sdpa", "sage", "flash")
MASK_MODES = ("rectangle", "alpha")
CFG_BATCH_MODES = ("auto", "batched", "separate")
OFFLOAD_MODES = ("release", "model", "none")  # encoders between uses: free them, keep them on the CPU, keep them
# How references reach the DiT and the training noise draws; which family uses which: bindweave_core.families
REFERENCE_CONDITIONINGS = ("slots", "rrope")
SIGMA_SAMPLINGS = ("shifted", "kaleido")
AUTO = "auto"  # an option that the DiT's family picks (training objective.conditioning, objective.sigma_sampling)

# --- training [12] ----------------------------------------------------------------------------
TRAIN_TIMESTEP_SHIFT = 5.0
TRAIN_LEARNING_RATE = 5e-6

# --- R-RoPE (Kaleido; facts and sources in docs/kaleido-rrope.md) -----------------------------
RROPE_POSITION_SHIFT = 80  # reference tokens sit at h, w = 80 + y, 80 + x (config max_h/max_w)
KALEIDO_MAX_REFERENCES = 3
KALEIDO_CANVAS_COLOUR = (255, 255, 255)  # references are letterboxed on white
KALEIDO_WIDTH = 896  # sampling_image_size [512, 896] is (height, width)
KALEIDO_HEIGHT = 512
KALEIDO_FRAMES = 81  # 21 latent frames
KALEIDO_FPS = 16
KALEIDO_STEPS = 50
KALEIDO_GUIDANCE = 6.0
KALEIDO_SHIFT = 7.0  # RFSampler's shift_scale default: sigma = 7u / (1 + 6u) on u = linspace(1, 0, steps+1)
KALEIDO_SAMPLER = "rf-euler"
# The sampling config's negative prompt (Wan's default Chinese negative prompt).
KALEIDO_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
# Training recipe (sgm RFLoss): logit-normal sigma, then a shift whose mu grows linearly with the
# number of latent patches per frame (256 -> 0.5, 4096 -> 1.15).
KALEIDO_TRAIN_MU_POINTS = ((256, 0.5), (4096, 1.15))


def latent_frames(num_frames: int) -> int:
    """Latent frames ``T`` for ``N = 4k+1`` video frames (spec intro)."""
    return (num_frames - 1) // VAE_TEMPORAL_FACTOR + 1


# --- context windows (bindweave_core.context_windows; ComfyUI's names and defaults) ---------------------------
CONTEXT_SCHEDULES = ("standard_static", "batched")
CONTEXT_FUSE_METHODS = ("pyramid", "flat", "overlap-linear")
DEFAULT_CONTEXT_SCHEDULE = "standard_static"  # ComfyUI's ContextWindowsManual default
DEFAULT_CONTEXT_FUSE = "pyramid"  # ComfyUI's default for both context nodes
DEFAULT_CONTEXT_OVERLAP = 16  # video frames (4 latent)
MAX_CONTEXT_FRAMES = 16384  # a widget bound only (ComfyUI's MAX_RESOLUTION, which its Wan context node uses)

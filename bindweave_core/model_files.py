"""The model files each component needs: names, ComfyUI folders, sources, sizes.

One table for error messages, the README's "which file goes where" table and the node tooltips.
Sizes are approximate download sizes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelFile:
    component: str  # dit | vae | text_encoder | clip_vision | planner | kaleido
    filename: str  # file (or directory) name as users have it
    comfy_folder: str  # folder under ComfyUI/models/
    source: str  # where to download it
    size: str  # approximate size
    note: str = ""
    url: str = ""  # direct download of a single file (used by the workflows' model entries)


_REPO_FILE = "https://huggingface.co/{}/resolve/main/{}.safetensors"
_WAN_REPACK = "Comfy-Org/Wan_2.1_ComfyUI_repackaged"

MODEL_FILES: tuple[ModelFile, ...] = (
    ModelFile("dit", "Wan2_1-I2V-14B-Bindweave_fp8_scaled_KJ.safetensors", "diffusion_models",
              "https://huggingface.co/Kijai/WanVideo_comfy_fp8_scaled (Bindweave folder)", "16.5 GB",
              "fp8 scaled, original Wan keys",
              _REPO_FILE.format("Kijai/WanVideo_comfy_fp8_scaled", "Bindweave/Wan2_1-I2V-14B-Bindweave_fp8_scaled_KJ")),
    ModelFile("dit", "BindWeave (diffusers directory)", "diffusion_models",
              "https://huggingface.co/ByteDance/BindWeave", "33 GB", "bf16, sharded diffusers layout"),
    ModelFile("dit", "BindWeave DiT GGUF (*-Q8_0.gguf ... *-Q4_K_M.gguf)", "unet",
              "a GGUF conversion of the BindWeave DiT (ComfyUI-GGUF's tools/convert.py, original Wan keys)",
              "9-17 GB", "for 12-16 GB cards; Q8_0, Q6_K, Q5_K_M, Q4_K_M; models/diffusion_models/ works too; "
              "needs pip install gguf"),
    ModelFile("vae", "wan_2.1_vae.safetensors", "vae",
              "https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged (split_files/vae)", "254 MB",
              url=_REPO_FILE.format(_WAN_REPACK, "split_files/vae/wan_2.1_vae")),
    ModelFile("text_encoder", "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "text_encoders",
              "https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged (split_files/text_encoders)", "6.7 GB",
              url=_REPO_FILE.format(_WAN_REPACK, "split_files/text_encoders/umt5_xxl_fp8_e4m3fn_scaled")),
    ModelFile("text_encoder", "umt5-xxl-enc-bf16.safetensors", "text_encoders",
              "https://huggingface.co/Kijai/WanVideo_comfy", "11.4 GB", "original Wan T5 keys"),
    ModelFile("clip_vision", "clip_vision_h.safetensors", "clip_vision",
              "https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged (split_files/clip_vision)", "1.3 GB",
              url=_REPO_FILE.format(_WAN_REPACK, "split_files/clip_vision/clip_vision_h")),
    ModelFile("planner", "qwen_2.5_vl_7b_fp8_scaled.safetensors", "text_encoders",
              "https://huggingface.co/Comfy-Org/Qwen-Image_ComfyUI (split_files/text_encoders)", "9.4 GB",
              url=_REPO_FILE.format("Comfy-Org/Qwen-Image_ComfyUI", "split_files/text_encoders/qwen_2.5_vl_7b_fp8_scaled")),
    ModelFile("planner", "qwen_2.5_vl_7b.safetensors", "text_encoders",
              "https://huggingface.co/Comfy-Org/Qwen-Image_ComfyUI (split_files/text_encoders)", "16.6 GB",
              url=_REPO_FILE.format("Comfy-Org/Qwen-Image_ComfyUI", "split_files/text_encoders/qwen_2.5_vl_7b")),
    ModelFile("planner", "Qwen2.5-VL-7B-Instruct (directory)", "bindweave",
              "https://huggingface.co/Qwen/Qwen2.5-VL-7B-Instruct", "16.6 GB",
              "Hugging Face directory; also does prompt refinement"),
    ModelFile("kaleido", "Kaleido-14B-S2V (directory)", "bindweave",
              "https://huggingface.co/zai-org/Kaleido-14B-S2V", "about 45 GB",
              "the whole download folder (SAT model/ + bundled VAE and UMT5); ComfyUI can use the usual "
              "wan_2.1_vae and umt5 files instead of the bundled ones"),
    ModelFile("lora", "lightx2v_I2V_14B_480p_cfg_step_distill_rank64_bf16.safetensors", "loras",
              "https://huggingface.co/Kijai/WanVideo_comfy (Lightx2v folder)", "0.7 GB",
              "optional: Wan2.1-I2V step-distill LoRA for the fast few-step workflow (experimental with BindWeave)",
              _REPO_FILE.format("Kijai/WanVideo_comfy", "Lightx2v/lightx2v_I2V_14B_480p_cfg_step_distill_rank64_bf16")),
)

COMPONENT_NAMES = {
    "dit": "BindWeave DiT", "vae": "Wan 2.1 VAE", "text_encoder": "UMT5-XXL text encoder",
    "clip_vision": "CLIP ViT-H/14 vision encoder", "planner": "Qwen2.5-VL-7B planner",
    "kaleido": "Kaleido-14B-S2V", "lora": "LoRA",
}


def files_for(component: str) -> list[ModelFile]:
    return [f for f in MODEL_FILES if f.component == component]


def where_to_get(component: str) -> str:
    """A sentence naming the expected files, their ComfyUI folder and where to download them."""
    files = files_for(component)
    if not files:
        return ""
    options = "; ".join(f"{f.filename} in models/{f.comfy_folder}/ from {f.source}" for f in files)
    return f"The {COMPONENT_NAMES.get(component, component)} is expected as: {options}."

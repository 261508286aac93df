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


MODEL_FILES: tuple[ModelFile, ...] = (
    ModelFile("dit", "Wan2_1-I2V-14B-Bindweave_fp8_scaled_KJ.safetensors", "diffusion_models",
              "https://huggingface.co/Kijai/WanVideo_comfy (Bindweave folder)", "16.5 GB", "fp8 scaled, original Wan keys"),
    ModelFile("dit", "BindWeave (diffusers directory)", "diffusion_models",
              "https://huggingface.co/ByteDance/BindWeave", "33 GB", "bf16, sharded diffusers layout"),
    ModelFile("vae", "wan_2.1_vae.safetensors", "vae",
              "https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged (split_files/vae)", "254 MB"),
    ModelFile("text_encoder", "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "text_encoders",
              "https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged (split_files/text_encoders)", "6.7 GB"),
    ModelFile("text_encoder", "umt5-xxl-enc-bf16.safetensors", "text_encoders",
              "https://huggingface.co/Kijai/WanVideo_comfy", "11.4 GB", "original Wan T5 keys"),
    ModelFile("clip_vision", "clip_vision_h.safetensors", "clip_vision",
              "https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged (split_files/clip_vision)", "1.3 GB"),
    ModelFile("planner", "qwen_2.5_vl_7b_fp8_scaled.safetensors", "text_encoders",
              "https://huggingface.co/Comfy-Org/Qwen-Image_ComfyUI (split_files/text_encoders)", "9.4 GB"),
    ModelFile("planner", "qwen_2.5_vl_7b.safetensors", "text_encoders",
              "https://huggingface.co/Comfy-Org/Qwen-Image_ComfyUI (split_files/text_encoders)", "16.6 GB"),
    ModelFile("planner", "Qwen2.5-VL-7B-Instruct (directory)", "bindweave",
              "https://huggingface.co/Qwen/Qwen2.5-VL-7B-Instruct", "16.6 GB",
              "Hugging Face directory; also does prompt refinement"),
)

COMPONENT_NAMES = {
    "dit": "BindWeave DiT", "vae": "Wan 2.1 VAE", "text_encoder": "UMT5-XXL text encoder",
    "clip_vision": "CLIP ViT-H/14 vision encoder", "planner": "Qwen2.5-VL-7B planner",
    "kaleido": "Kaleido-14B-S2V",
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

"""Test helpers: where the test data lives (tests/data, shipped with the repo), deterministic weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# Real data the fidelity tests compare against, copied (trimmed) from the project's shared data into the
# repo so that a fresh clone checks them; tests/data/README.md says where each file came from.
DATA = REPO / "tests" / "data"
PARITY_FILE = DATA / "official-parity/bindweave_dit_tiny_seed1234.safetensors"
OFFICIAL_SCHEDULE = DATA / "official-schedule/unipc_official.json"
SAMPLES = DATA / "opens2v-samples"
QWEN_TOKENIZER = DATA / "tokenizers/qwen2.5"


# The only reasons a test may skip for (CI fails on any other, see conftest.py): what the machine lacks.
ALLOWED_SKIP_REASONS = (
    "needs a ComfyUI server",
    "needs a CUDA GPU",
    "needs a browser",
    "needs a kernel this CPU build lacks",
    "needs an optional extra",
)


def need(path: Path) -> Path:
    """A test data file that ships with the repo: a missing one is a broken checkout, never a skip."""
    if not path.exists():
        pytest.fail(f"test data missing from the checkout: {path} (tests/data/README.md lists what belongs there)")
    return path


def randomize_(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Give every parameter seeded random values (so zero-initialised tables matter too)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            offset = 1.0 if ("norm" in name and name.endswith("weight")) else 0.0  # norm gains near 1
            p.copy_(torch.randn(p.shape, generator=g) * scale + offset)
    return model

# ComfyUI core nodes the example workflows use, with their widget names in the order the frontend
# stores their values. Checked against a real server's /object_info by tests/test_comfyui_e2e.py.
CORE_NODES = {
    "LoadImage": ["image", "upload"],
    "PreviewImage": [],
    "MaskPreview": [],
    "EmptyImage": ["width", "height", "batch_size", "color"],
    "CreateVideo": ["fps", "bit_depth"],
    "SaveVideo": ["filename_prefix", "format", "format.codec", "codec"],
    # the native route (workflows bindweave_native_*)
    "KSampler": ["seed", "control_after_generate", "steps", "cfg", "sampler_name", "scheduler", "denoise"],
    "ModelSamplingSD3": ["shift"],
    "LoraLoaderModelOnly": ["lora_name", "strength_model"],
    "VAELoader": ["vae_name"],
    "VAEDecode": [],
}
FRONTEND_ONLY_NODES = {"MarkdownNote": ["text"], "Note": ["text"]}
# Widgets the frontend adds that are not inputs of the server's schema.
FRONTEND_WIDGETS = {"upload", "control_after_generate"}


def tiny_dit_inputs(seed: int = 22) -> dict:
    """Inputs of one BindWeave DiT call for the "tiny" preset (2 latent frames of 4x6, 6 planner tokens)."""
    from bindweave_core.config import PRESETS

    tiny = PRESETS["tiny"]
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, 16, 2, 4, 6, generator=g), timestep=torch.tensor([333.0]),
                encoder_hidden_states=torch.randn(1, 512, tiny.text_dim, generator=g),
                encoder_hidden_states_image=torch.randn(1, 1028, tiny.image_dim, generator=g),
                planner_states=torch.randn(1, 6, tiny.planner_dim, generator=g),
                condition=torch.randn(1, 20, 6, 4, 6, generator=g))

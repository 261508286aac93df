"""``generate --lora FILE[:STRENGTH]`` and ``add_loras``: parsing, applying to a loaded or lazily loaded
DiT (tiny smoke models), and the command line's frames changing with the LoRA."""

from __future__ import annotations

import json

import pytest
import torch

from bindweave_core.errors import InputError
from bindweave_core.lora import LoraLayer, LoraWeights, save_lora
from bindweave_core.lora_specs import add_loras, parse_lora_spec
from bindweave_core.pipeline import BindWeavePipeline, Lazy
from bindweave_core.smoke import smoke_dit

NAME = "blocks.0.attn1.to_q"


@pytest.fixture()
def lora_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    layer = LoraLayer(torch.randn(4, 64, generator=g), torch.randn(64, 4, generator=g), alpha=2.0)
    return save_lora(LoraWeights(layers={NAME: layer, "blocks.1.ffn.net.2": LoraLayer(
        torch.randn(4, 128, generator=g), torch.randn(64, 4, generator=g), alpha=4.0)}), tmp_path / "my.safetensors"), layer


def test_parse_lora_spec(tmp_path, lora_file):
    path, _ = lora_file
    assert parse_lora_spec(str(path)) == (path, 1.0)
    assert parse_lora_spec(f"{path}:0.5") == (path, 0.5)
    assert parse_lora_spec(f"{path}:-1") == (path, -1.0)
    odd = tmp_path / "a:b"
    odd.mkdir()
    (odd / "x.safetensors").write_bytes(path.read_bytes())
    assert parse_lora_spec(str(odd / "x.safetensors")) == (odd / "x.safetensors", 1.0)  # the colon is the path's
    with pytest.raises(InputError, match="no LoRA file at .*missing.safetensors"):
        parse_lora_spec(str(tmp_path / "missing.safetensors:0.8"))
    with pytest.raises(InputError, match="finite number"):
        parse_lora_spec(f"{path}:inf")


def test_add_loras_to_a_loaded_and_to_a_lazy_dit(lora_file):
    path, layer = lora_file
    base = smoke_dit(0).blocks[0].attn1.to_q.weight.detach().clone()
    want = base + 0.75 * (2.0 / 4) * layer.up @ layer.down

    pipe = BindWeavePipeline.smoke(seed=0)
    add_loras(pipe, [f"{path}:0.75"])
    torch.testing.assert_close(pipe.component("dit").blocks[0].attn1.to_q.weight, want, rtol=0, atol=1e-6)

    lazy = BindWeavePipeline(dit=Lazy(lambda: smoke_dit(0), "tiny"), vae=None, text_encoder=None, offload="release")
    add_loras(lazy, [f"{path}:0.25", f"{path}:0.5"])  # two LoRAs add up
    for _ in range(2):  # every (re)load gets them
        with lazy.on_device("dit") as dit:
            torch.testing.assert_close(dit.blocks[0].attn1.to_q.weight, want, rtol=0, atol=1e-6)


def test_generate_command_applies_the_lora(tmp_path, lora_file):
    from bindweave_core.cli import main
    from bindweave_core.video_io import read_video
    from training.make_example_dataset import reference_images

    path, _ = lora_file
    ref = tmp_path / "ref.png"
    reference_images("disc", (220, 40, 40), 32)[0].save(ref)
    common = ["generate", "--smoke", "--ref", str(ref), "--prompt", "a red disc", "--steps", "2",
              "--width", "32", "--height", "32", "--frames", "5"]
    assert main(common + ["--out", str(tmp_path / "plain.mp4")]) == 0
    assert main(common + ["--lora", f"{path}:3", "--out", str(tmp_path / "lora.mp4")]) == 0
    plain, with_lora = (read_video(tmp_path / f"{n}.mp4")[0].astype(int) for n in ("plain", "lora"))
    assert (plain != with_lora).any()
    assert json.loads((tmp_path / "lora.json").read_text())["models"]["loras"] == [f"{path}:3"]

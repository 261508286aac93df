"""Inputs read the same way on every path and checked before the planner runs: EXIF orientation (a real
JPEG tagged 6), tensor range and layout in both families, reference and mask sizes, prompt length and
invisible prompts, LoRA shapes against a DiT not loaded yet, and a full disk while writing the MP4."""

from __future__ import annotations

import errno
import os
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from bindweave_core import constants as C
from bindweave_core.errors import CheckpointError, InputError, OutputWriteError
from bindweave_core.pipeline import BindWeavePipeline, GenerationSettings
from helpers import REPO

EXAMPLE = REPO / "examples/singleface_1/man.png"
ORIENTATION = 0x0112


def tagged_jpeg(path, orientation: int = 6) -> np.ndarray:
    """A 40x24 JPEG (wide) with a red left third, carrying EXIF orientation; returns the stored pixels."""
    pixels = np.zeros((24, 40, 3), np.uint8)
    pixels[:, :13] = (220, 20, 20)
    pixels[:, 13:] = (20, 20, 220)
    pixels[:4] = (20, 220, 20)  # a green top band: tells a rotation from a flip
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    Image.fromarray(pixels).save(path, format="JPEG", quality=95, exif=exif)
    with Image.open(path) as im:
        assert im.getexif()[ORIENTATION] == orientation and im.size == (40, 24)
        return np.asarray(im.convert("RGB"))


def test_exif_orientation_6_is_applied_on_every_path_like_comfyui_loadimage(tmp_path):
    from bindweave_core.images import load_rgb, open_image
    from bindweave_core.preflight import check_images
    from bindweave_core.references import load_image, prepare_references

    path = tmp_path / "phone.jpg"
    stored = tagged_jpeg(path)
    upright = np.rot90(stored, k=-1)  # orientation 6: the camera was turned; show it turned 90 degrees clockwise
    assert upright.shape == (40, 24, 3)
    assert (upright[:, -4:] == stored[:4].transpose(1, 0, 2)[:, ::-1][:, -4:]).all()
    for read in (open_image, load_rgb, load_image):  # CLI preflight, planner/training frames, references/training
        np.testing.assert_array_equal(np.asarray(read(path).convert("RGB")), upright)
    # the same canvas as from the upright picture given as a PIL image (what ComfyUI's LoadImage hands the nodes)
    from_file, _ = prepare_references([path], 64, 64)
    from_pil, _ = prepare_references([Image.fromarray(np.ascontiguousarray(upright))], 64, 64)
    assert torch.equal(from_file, from_pil)
    check_images([path])  # the CLI's preflight reads it too
    # a mask with the same tag is turned the same way (it must still match its reference)
    mask = tmp_path / "mask.jpg"
    tagged_jpeg(mask)
    check_images([path], [mask])
    prepare_references([path], 64, 64, masks=[load_image(mask).convert("L")])


def test_untagged_and_orientation_1_images_are_unchanged(tmp_path):
    from bindweave_core.images import open_image

    one = tmp_path / "one.jpg"
    stored = tagged_jpeg(one, orientation=1)
    np.testing.assert_array_equal(np.asarray(open_image(one)), stored)
    png = tmp_path / "plain.png"
    Image.fromarray(stored).save(png)
    np.testing.assert_array_equal(np.asarray(open_image(png)), stored)


def test_training_reads_references_upright(tmp_path):
    from training.dataset import load_image as training_load_image

    path = tmp_path / "phone.jpg"
    stored = tagged_jpeg(path)
    assert training_load_image(path).size == (24, 40)
    np.testing.assert_array_equal(np.asarray(training_load_image(path)), np.rot90(stored, k=-1))


@pytest.mark.parametrize("family", ["bindweave", "kaleido"])
def test_tensor_references_out_of_range_or_channels_first_are_refused_in_both_families(family):
    from bindweave_core.families import family_for

    prepare = family_for(family).prepare_references
    good = torch.rand(1, 32, 48, 3)
    canvases, _ = prepare(good, 64, 64)
    assert canvases.shape == (1, 64, 64, 3)
    with pytest.raises(InputError, match=r"holds values from .* to 2\d\d.*refused, not rescaled or clamped.*"
                                         r"divide it by 255"):
        prepare(good * 255, 64, 64)  # Kaleido's generate used to clamp this to white
    with pytest.raises(InputError, match=r"channels last.*looks channels-first"):
        prepare(good.permute(0, 3, 1, 2), 64, 64)
    with pytest.raises(InputError, match=r"mask 1 holds values from 0 to 255"):
        prepare(good, 64, 64, masks=[torch.full((32, 48), 255.0).index_fill_(0, torch.tensor([0]), 0.0)])


def test_tiny_reference_and_mismatched_mask_are_refused_before_the_planner(monkeypatch):
    pipe = BindWeavePipeline.smoke(seed=0)
    planner = pipe.component("planner")
    monkeypatch.setattr(planner, "encode", lambda *a, **k: pytest.fail("the planner ran"))
    monkeypatch.setattr(planner, "refine_prompt", lambda *a, **k: pytest.fail("the planner ran"))
    settings = GenerationSettings(prompt="a man waves", width=32, height=32, num_frames=1, steps=1)
    with pytest.raises(InputError, match=rf"is 1x1 pixels; references must be at least {C.MIN_REFERENCE_SIDE}x"):
        pipe.generate([Image.new("RGB", (1, 1))], settings)
    with pytest.raises(InputError, match=r"mask 1 is 20x20 but its reference image is 40x30"):
        pipe.generate([Image.new("RGB", (40, 30))], settings, masks=[torch.ones(20, 20)])
    with pytest.raises(InputError, match=r"holds values from"):
        pipe.generate([torch.rand(30, 40, 3) * 255], settings)
    refine = GenerationSettings(prompt="a man waves", width=32, height=32, num_frames=1, steps=1, refine_prompt=True)
    with pytest.raises(InputError, match=r"is 1x1 pixels"):
        pipe.generate([Image.new("RGB", (1, 1))], refine)


def test_prompt_length_cap_and_invisible_prompts():
    huge = "a cat " * ((1 << 20) // 6 + 1)  # over 1 MiB
    assert len(huge.encode()) > 1 << 20
    with pytest.raises(InputError, match=rf"is {len(huge):,} characters long; the limit is "
                                         rf"{C.MAX_PROMPT_CHARACTERS:,} characters"):
        GenerationSettings(prompt=huge).validate(1)
    GenerationSettings(prompt="x" * C.MAX_PROMPT_CHARACTERS).validate(1)  # the cap itself is accepted
    for invisible in ("\u200b\u200b", "\ufeff", "\u2060 \u200d", "\x00\x01"):
        with pytest.raises(InputError, match=r"only invisible characters"):
            GenerationSettings(prompt=invisible).validate(1)
    GenerationSettings(prompt="\u200bcat").validate(1)
    GenerationSettings(prompt="a cat", negative_prompt="").validate(1)  # a blank negative prompt is valid
    with pytest.raises(InputError, match="negative prompt is"):
        GenerationSettings(prompt="a cat", negative_prompt="x" * (C.MAX_PROMPT_CHARACTERS + 1)).validate(1)


def test_lora_shapes_are_checked_against_a_dit_not_loaded_yet(tmp_path):
    from safetensors.torch import save_file

    from bindweave_core.config import PRESETS
    from bindweave_core.lazy import Lazy
    from bindweave_core.lora_specs import add_loras

    config = PRESETS["tiny"]
    dim = config.num_heads * config.head_dim
    path = tmp_path / "for-14b.safetensors"
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.zeros(4, 5120),
               "diffusion_model.blocks.0.self_attn.q.lora_B.weight": torch.zeros(5120, 4)}, str(path))
    smoke = BindWeavePipeline.smoke(seed=0)
    loads = []
    lazy = Lazy(lambda: loads.append(1), "dit.safetensors", family="bindweave", meta={"config": config})
    pipe = BindWeavePipeline(dit=lazy, vae=smoke.current("vae"), text_encoder=smoke.current("text_encoder"),
                             device="cpu")
    with pytest.raises(CheckpointError, match=rf"--lora {path}: this LoRA does not fit the model: 1 entries have the "
                                              rf"wrong shape: blocks\.0\.attn1\.to_q \(LoRA \[5120, 4\] x \[4, 5120\], "
                                              rf"layer {dim} x {dim}\)"):
        add_loras(pipe, [str(path)])
    assert loads == []  # nothing was loaded


def test_full_disk_while_writing_the_video_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    import av

    from bindweave_core.video_io import write_mp4

    real_open = av.open

    def full_disk_open(*args, **kwargs):
        container = real_open(*args, **kwargs)

        class Full:
            def __getattr__(self, name):
                return getattr(container, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                container.close()

            def mux(self, packet):
                raise av.error.OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        return Full()

    monkeypatch.setattr(av, "open", full_disk_open)
    out = tmp_path / "out" / "video.mp4"
    with pytest.raises(OutputWriteError, match=r"^could not write .*video\.mp4: No space left on device; free some "
                                               r"space there or choose another output folder\. No partial file"):
        write_mp4(torch.rand(3, 32, 32, 3), out)
    assert list((tmp_path / "out").iterdir()) == []


def _mount_tmpfs(where, size: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True).returncode == 0


def test_full_disk_on_a_real_tiny_tmpfs(tmp_path):
    """generate_to_file (what the CLI calls) writing to a 16 KiB tmpfs: one clear error, neither the video nor
    its sidecar nor a temp file left (root only; tools/bad_inputs.py runs the whole command the same way)."""
    from types import SimpleNamespace

    from bindweave_core.generate_cli import generate_to_file

    out_dir = tmp_path / "small"
    if not _mount_tmpfs(out_dir, "16k"):
        pytest.skip("cannot mount a tmpfs here (needs root and mount rights)")
    frames = torch.rand(9, 96, 160, 3, generator=torch.Generator().manual_seed(0))  # noise: ~70 KB of H.264
    settings = GenerationSettings(prompt="a man waves", width=160, height=96, num_frames=9)
    def generate(*args, frame_sink, **kwargs):  # the pipeline streams decoded chunks into the writer
        frame_sink(frames)
        return SimpleNamespace(frames=frames[:0], prompt=settings.prompt, timings={}, step_cache=None, windows=None)

    pipe = SimpleNamespace(device=torch.device("cpu"), last_estimate=None, generate=generate)
    try:
        with pytest.raises(OutputWriteError, match=r"could not write .*small/video\.mp4: No space left on device"):
            generate_to_file(pipe, [str(EXAMPLE)], settings, out_dir / "video.mp4")
        assert list(out_dir.iterdir()) == []
    finally:
        subprocess.run(["umount", str(out_dir)], check=False)


def test_an_encoder_whose_weights_cannot_fit_is_refused_before_anything_loads(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from bindweave_core import preflight
    from bindweave_core.encoder_loaders import file_identity_meta
    from bindweave_core.errors import OutOfMemoryError
    from bindweave_core.lazy import Lazy
    from bindweave_core.stage_memory import file_weight_bytes

    path = tmp_path / "umt5.safetensors"
    save_file({"encoder.weight": torch.zeros(256, 256), "ids": torch.zeros(10, dtype=torch.int64)}, str(path))
    assert file_weight_bytes(str(path), torch.bfloat16) == 256 * 256 * 2 + 10 * 8  # floats at bf16, ints as stored
    assert file_weight_bytes(str(path), torch.float32) == 256 * 256 * 4 + 10 * 8
    smoke = BindWeavePipeline.smoke(seed=0)
    loads = []
    text = Lazy(lambda: loads.append(1), str(path), meta=file_identity_meta(str(path), torch.float32))
    pipe = BindWeavePipeline(dit=smoke.current("dit"), vae=smoke.current("vae"), text_encoder=text,
                             clip_vision=smoke.current("clip_vision"), planner=smoke.current("planner"), device="cpu")
    planner = pipe.component("planner")
    monkeypatch.setattr(planner, "encode", lambda *a, **k: pytest.fail("the planner ran"))
    loaded = sum(t.nbytes for n in ("dit", "vae", "clip_vision", "planner")
                 for t in list(pipe._module(pipe.component(n)).parameters()) + list(pipe._module(
                     pipe.component(n)).buffers()))
    need = 256 * 256 * 4 + 80
    monkeypatch.setattr(preflight, "available_cpu_memory", lambda: need - loaded - 1)
    settings = GenerationSettings(prompt="a man waves", width=32, height=32, num_frames=1, steps=1)
    with pytest.raises(OutOfMemoryError, match=rf"the text encoder \(UMT5-XXL\) cannot fit on cpu: its weights alone "
                                               rf"take 0\.0 GiB in float32 \({path}\).*Nothing was loaded"):
        pipe.generate([EXAMPLE], settings)
    assert loads == []
    monkeypatch.setattr(preflight, "available_cpu_memory", lambda: need - loaded)  # exactly fits: not refused
    from bindweave_core.stage_memory import check_encoder_stages

    check_encoder_stages(pipe, ("text_encoder",))

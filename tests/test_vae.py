"""The Wan 2.1 VAE wrapper: normalisation, reference slots, video condition, tiling, loading.

Expected values come from direct diffusers calls and from this file's own key renaming, never from
the wrapper under test.
"""

from __future__ import annotations

import inspect
import json
import re
import time

import pytest
import torch
from diffusers import AutoencoderKLWan
from safetensors.torch import save_file

from bindweave_core import cli
from bindweave_core import constants as C
from bindweave_core.checkpoints.safetensors_io import TensorInfo
from bindweave_core.encoders.vae import WAN21_VAE_CONFIG, WanVAE, inspect_report
from bindweave_core.errors import CheckpointError, InputError

# Published Wan 2.1 statistics (Wan's wan/modules/vae.py and the Wan-AI ...-Diffusers vae/config.json).
WAN21_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
              0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
WAN21_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
             3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]


@pytest.fixture(scope="module")
def vae() -> WanVAE:
    torch.set_num_threads(2)
    return WanVAE.tiny(seed=0)


def stats(model: AutoencoderKLWan) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(model.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(model.config.latents_std).view(1, 16, 1, 1, 1)
    return mean, std


def direct_encode(model: AutoencoderKLWan, x: torch.Tensor) -> torch.Tensor:
    mean, std = stats(model)
    with torch.no_grad():
        return (model.encode(x).latent_dist.mode() - mean) / std


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ config
def test_config_is_the_released_wan21_vae():
    defaults = {k: p.default for k, p in inspect.signature(AutoencoderKLWan.__init__).parameters.items()}
    assert WAN21_VAE_CONFIG["latents_mean"] == WAN21_MEAN == defaults["latents_mean"]
    assert WAN21_VAE_CONFIG["latents_std"] == WAN21_STD == defaults["latents_std"]
    assert (WAN21_VAE_CONFIG["base_dim"], WAN21_VAE_CONFIG["z_dim"], WAN21_VAE_CONFIG["num_res_blocks"]) == (96, 16, 2)
    assert WAN21_VAE_CONFIG["dim_mult"] == [1, 2, 4, 4] and WAN21_VAE_CONFIG["attn_scales"] == []
    assert WAN21_VAE_CONFIG["temperal_downsample"] == [False, True, True]


def test_tiny_is_a_real_wan_vae_with_nontrivial_statistics(vae):
    assert isinstance(vae.model, AutoencoderKLWan)
    assert vae.model.config.z_dim == 16 and vae.model.config.base_dim == 8
    mean, std = stats(vae.model)
    assert mean.abs().min() > 0 and mean.std() > 0.1 and (std - 1).abs().min() > 0.04
    a, b = WanVAE.tiny(seed=0), WanVAE.tiny(seed=1)
    assert torch.equal(a.model.encoder.conv_in.weight, vae.model.encoder.conv_in.weight)
    assert not torch.equal(a.model.encoder.conv_in.weight, b.model.encoder.conv_in.weight)


def test_tiny_is_fast_enough_for_the_smoke_pipeline(vae):
    x = rand(1, 3, 9, 64, 64) * 2 - 1
    vae.decode(vae.encode(x))  # warm-up
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # CPU time of one thread: stable even when other jobs share the cores
    try:
        t0 = time.process_time()
        z = vae.encode(x)
        y = vae.decode(z)
        elapsed = time.process_time() - t0
    finally:
        torch.set_num_threads(threads)
    assert z.shape == (1, 16, 3, 8, 8) and y.shape == (1, 3, 9, 64, 64)
    assert elapsed < 3.0, f"tiny VAE encode+decode of 9x64x64 took {elapsed:.2f} s of CPU"


# ------------------------------------------------------------------------------------------ normalisation
def test_encode_is_normalised_posterior_mean(vae):
    x = rand(1, 3, 9, 32, 48, seed=1) * 2 - 1
    got = vae.encode(x)
    assert got.shape == (1, 16, 3, 4, 6) and got.dtype == torch.float32
    torch.testing.assert_close(got, direct_encode(vae.model, x), rtol=0, atol=1e-6)
    with torch.no_grad():  # not a sample of the posterior: the same call twice gives the same latents
        raw = vae.model.encode(x).latent_dist
    assert not torch.allclose(raw.mean, raw.sample(generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(vae.encode(x), got, rtol=0, atol=0)


def test_decode_is_the_inverse_formula(vae):
    z = torch.randn(1, 16, 2, 4, 6, generator=torch.Generator().manual_seed(2))
    mean, std = stats(vae.model)
    with torch.no_grad():
        expected = vae.model.decode(z * std + mean).sample
    got = vae.decode(z)
    assert got.shape == (1, 3, 5, 32, 48)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert got.min() >= -1 and got.max() <= 1


def test_reference_encoded_as_single_frame(vae):
    canvases = rand(2, 32, 48, 3, seed=3)
    latents = vae.reference_latents(canvases)
    assert latents.shape == (1, 2, 16, 4, 6)
    for i in range(2):
        frame = canvases[i].permute(2, 0, 1)[None, :, None] * 2 - 1  # [1, 3, 1, H, W] in [-1, 1]
        torch.testing.assert_close(latents[0, i][None, :, None], direct_encode(vae.model, frame), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------ conditions
def test_slot_layout_channel_by_channel(vae):
    H, W = 64, 96
    canvases = rand(2, H, W, 3, seed=4)
    masks = torch.zeros(2, H, W)
    masks[0, 3:61, 10:77] = 1  # edges off the 8-pixel grid
    masks[1, :, 40:56] = 1
    slots = vae.reference_slots(canvases, masks)
    assert slots.shape == (1, 20, 4, 8, 12)
    for k in range(2):
        # nearest 8x downsampling picks source pixel 8*i (floor of i * 64/8)
        torch.testing.assert_close(slots[0, 0, k], masks[k, ::8, ::8], rtol=0, atol=0)
        assert not slots[0, 1:4, k].any()
        frame = canvases[k].permute(2, 0, 1)[None, :, None] * 2 - 1
        torch.testing.assert_close(slots[0, 4:, k], direct_encode(vae.model, frame)[0, :, 0], rtol=0, atol=1e-6)
    assert slots[0, 0, 0].sum() == 7 * 8  # rows 8..56, columns 16..72 of the pixel mask
    assert not slots[0, :, 2:].any(), "unused slots are all zero"


@pytest.mark.parametrize("frames,latent_frames", [(9, 3), (17, 5)])
def test_condition_shape_and_video_part(vae, frames, latent_frames):
    H, W = 32, 48
    canvases, masks = rand(1, H, W, 3, seed=5), torch.ones(1, H, W)
    cond = vae.condition(canvases, masks, frames)
    assert cond.shape == (1, 20, 4 + latent_frames, 4, 6)
    assert C.latent_frames(frames) == latent_frames
    torch.testing.assert_close(cond[:, :, :4], vae.reference_slots(canvases, masks), rtol=0, atol=0)
    video = cond[:, :, 4:]
    assert not video[:, :4].any(), "4 zero mask channels in front of the video latents"
    zeros = torch.zeros(1, 3, frames, H, W)
    torch.testing.assert_close(video[:, 4:], direct_encode(vae.model, zeros), rtol=0, atol=1e-6)
    assert video[:, 4:].abs().sum() > 0  # normalised zeros are not zero


def test_video_condition_is_cached(vae, monkeypatch):
    first = vae.video_condition(5, 16, 32)
    calls = []
    original = vae.model.encode
    monkeypatch.setattr(vae.model, "encode", lambda *a, **k: calls.append(1) or original(*a, **k))
    again = vae.video_condition(5, 16, 32)
    assert calls == [] and torch.equal(first, again) and again.shape == (1, 20, 2, 2, 4)
    vae.video_condition(9, 16, 32)
    assert calls == [1]


def test_bad_frames_and_sizes(vae):
    with pytest.raises(InputError, match=r"frames must be 4k\+1 \(e.g. 9 or 13\), got 10"):
        vae.video_condition(10, 32, 32)
    with pytest.raises(InputError, match="height must be a positive multiple of 16, got 40"):
        vae.video_condition(9, 40, 32)
    with pytest.raises(InputError, match="width must be a positive multiple of 16, got 24"):
        vae.encode(torch.zeros(1, 3, 1, 32, 24))
    with pytest.raises(InputError, match="encodes videos"):
        vae.encode(torch.zeros(1, 4, 1, 32, 32))
    with pytest.raises(InputError, match="5 reference images given; BindWeave takes 1 to 4"):
        vae.reference_slots(torch.zeros(5, 32, 32, 3), torch.zeros(5, 32, 32))
    with pytest.raises(InputError, match="masks must be"):
        vae.reference_slots(torch.zeros(1, 32, 32, 3), torch.zeros(1, 16, 32))


# ------------------------------------------------------------------------------------------ tiling
def test_tiled_decode_close_to_untiled(vae):
    z = torch.randn(1, 16, 1, 24, 24, generator=torch.Generator().manual_seed(6))
    whole = vae.decode(z)
    vae.enable_tiling(tile_size=128, tile_stride=96)  # 2 x 2 tiles, 4 latent pixels of overlap
    try:
        assert vae.tiling
        tiled = vae.decode(z)
        # wiring: the same as diffusers' own tiled decode with the same pixel tile sizes
        reference = AutoencoderKLWan.from_config(vae.model.config)
        reference.load_state_dict(vae.model.state_dict())
        reference.enable_tiling(tile_sample_min_height=128, tile_sample_min_width=128,
                                tile_sample_stride_height=96, tile_sample_stride_width=96)
        mean, std = stats(reference)
        with torch.no_grad():
            torch.testing.assert_close(tiled, reference.decode(z * std + mean).sample, rtol=0, atol=1e-6)
        x = rand(1, 3, 1, 192, 192, seed=7) * 2 - 1
        assert vae.encode(x).shape == (1, 16, 1, 24, 24)
    finally:
        vae.disable_tiling()
    assert tiled.shape == whole.shape == (1, 3, 1, 192, 192)
    diff = (tiled - whole).abs()
    assert diff.max() > 0, "tiling was not used"
    # random weights have a wide receptive field (and a global mid-block attention), so this is
    # a loose bound; measured: mean |diff| ~0.04 of mean |x| ~0.27, correlation ~0.98
    assert diff.mean() < 0.25 * whole.abs().mean()
    assert torch.corrcoef(torch.stack([tiled.flatten(), whole.flatten()]))[0, 1] > 0.95
    with pytest.raises(InputError, match="multiples of 8"):
        vae.enable_tiling(tile_size=100, tile_stride=64)
    assert not vae.tiling


# ------------------------------------------------------------------------------------------ files
def to_original_name(key: str) -> str:
    """diffusers AutoencoderKLWan name -> the original Wan 2.1 VAE name (written here independently)."""
    resnet = {"norm1.gamma": "residual.0.gamma", "conv1": "residual.2", "norm2.gamma": "residual.3.gamma",
              "conv2": "residual.6", "conv_shortcut": "shortcut"}

    def rename_resnet(rest: str) -> str:
        for new, old in resnet.items():
            if rest.startswith(new + ".") or rest == new:
                return old + rest[len(new):]
        return rest  # resample.1.*, time_conv.*

    top = {"quant_conv.": "conv1.", "post_quant_conv.": "conv2.", "encoder.conv_in.": "encoder.conv1.",
           "decoder.conv_in.": "decoder.conv1.", "encoder.norm_out.": "encoder.head.0.",
           "decoder.norm_out.": "decoder.head.0.", "encoder.conv_out.": "encoder.head.2.",
           "decoder.conv_out.": "decoder.head.2."}
    for new, old in top.items():
        if key.startswith(new):
            return old + key[len(new):]
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)", key):
        return f"{m[1]}.middle.{2 * int(m[2])}.{rename_resnet(m[3])}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
        return f"{m[1]}.middle.1.{m[2]}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.(.+)", key):
        return f"encoder.downsamples.{m[1]}.{rename_resnet(m[2])}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d)\.resnets\.(\d)\.(.+)", key):  # 3 resnets + 1 resample per stage
        return f"decoder.upsamples.{4 * int(m[1]) + int(m[2])}.{rename_resnet(m[3])}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d)\.upsamplers\.0\.(.+)", key):
        return f"decoder.upsamples.{4 * int(m[1]) + 3}.{m[2]}"
    raise AssertionError(f"no original name for {key}")


def original_state_dict(model: AutoencoderKLWan) -> dict[str, torch.Tensor]:
    sd = {to_original_name(k): v.clone() for k, v in model.state_dict().items()}
    assert len(sd) == len(model.state_dict()) == 194
    # real Wan 2.1 names: shortcut only where the channel count changes, time_conv on the 3d resamples
    for key in ("encoder.conv1.weight", "conv1.weight", "conv2.weight", "decoder.conv1.weight",
                "encoder.downsamples.3.shortcut.weight", "encoder.downsamples.5.time_conv.weight",
                "encoder.downsamples.2.resample.1.weight", "encoder.middle.1.to_qkv.weight",
                "decoder.middle.2.residual.6.weight", "decoder.upsamples.4.shortcut.weight",
                "decoder.upsamples.3.time_conv.weight", "decoder.upsamples.11.resample.1.weight",
                "decoder.upsamples.14.residual.6.bias", "decoder.head.2.weight", "encoder.head.0.gamma"):
        assert key in sd, key
    assert "decoder.upsamples.11.time_conv.weight" not in sd  # the last upsample is 2-d only
    return sd


def assert_same_model(loaded: WanVAE, vae: WanVAE, normalised_too: bool = True) -> None:
    x = rand(1, 3, 5, 32, 32, seed=8) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.encode(x).latent_dist.mode(), vae.model.encode(x).latent_dist.mode(),
                                   rtol=0, atol=0)
    if normalised_too:
        z = vae.encode(x)
        torch.testing.assert_close(loaded.encode(x), z, rtol=0, atol=0)
        torch.testing.assert_close(loaded.decode(z), vae.decode(z), rtol=0, atol=0)


def test_single_file_in_original_layout(vae, tmp_path):
    sd = original_state_dict(vae.model)
    meta = {"bindweave_vae_config": json.dumps({"latents_mean": vae.model.config.latents_mean,
                                                 "latents_std": vae.model.config.latents_std, "base_dim": 8})}
    save_file(sd, str(tmp_path / "wan_2.1_vae.safetensors"), metadata=meta)
    loaded = WanVAE.load(tmp_path / "wan_2.1_vae.safetensors", dtype=torch.float32)
    assert loaded.checkpoint_info.layout == "wan-original"
    assert_same_model(loaded, vae)

    # a file as ComfyUI users have it (no metadata): widths from the shapes, Wan 2.1 statistics
    save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, str(tmp_path / "plain.safetensors"))
    plain = WanVAE.load(tmp_path / "plain.safetensors")  # default dtype bf16, kept as stored
    assert plain.dtype == torch.bfloat16 and plain.model.config.base_dim == 8
    assert plain.model.config.latents_mean == WAN21_MEAN and plain.model.config.latents_std == WAN21_STD
    torch.testing.assert_close(plain.model.decoder.conv_in.weight, vae.model.decoder.conv_in.weight.bfloat16(),
                               rtol=0, atol=0)


def test_hf_directory_and_diffusers_single_file(vae, tmp_path):
    vae.model.save_pretrained(tmp_path / "repo" / "vae")  # config.json + diffusion_pytorch_model.safetensors
    vae_dir = tmp_path / "repo" / "vae"
    for path in (vae_dir, tmp_path / "repo", vae_dir / "diffusion_pytorch_model.safetensors"):
        loaded = WanVAE.load(path, dtype=torch.float32)
        assert loaded.checkpoint_info.layout == "diffusers"
        assert_same_model(loaded, vae)
    prefixed = {"first_stage_model." + k: v for k, v in vae.model.state_dict().items()}
    save_file(prefixed, str(tmp_path / "diffusers_vae.safetensors"))
    assert_same_model(WanVAE.load(tmp_path / "diffusers_vae.safetensors", dtype=torch.float32), vae,
                      normalised_too=False)


def test_full_size_header_is_recognised(tmp_path):
    with torch.device("meta"):
        full = AutoencoderKLWan(base_dim=96, z_dim=16)
    infos = {to_original_name(k): TensorInfo(tmp_path / "wan_2.1_vae.safetensors", to_original_name(k),
                                             torch.bfloat16, tuple(v.shape)) for k, v in full.state_dict().items()}
    assert infos["encoder.conv1.weight"].shape == (96, 3, 3, 3, 3)
    assert infos["decoder.upsamples.4.shortcut.weight"].shape == (384, 192, 1, 1, 1)
    report = inspect_report(tmp_path, infos, {})
    assert report["family"] == "wan2.1-vae" and report["layout"] == "wan-original" and report["problems"] == []
    assert report["config"]["base_dim"] == 96 and report["config"]["z_dim"] == 16


def test_wrong_files_say_what_they_are(vae, tmp_path):
    with pytest.raises(CheckpointError, match=r"absent.safetensors: no such file.*wan_2.1_vae.safetensors in "
                                              r"models/vae/ from https://huggingface.co/Comfy-Org"):
        WanVAE.load(tmp_path / "absent.safetensors")
    dit = {"blocks.0.self_attn.q.weight": torch.zeros(4, 4), "patch_embedding.weight": torch.zeros(4, 36, 1, 2, 2)}
    save_file(dit, str(tmp_path / "dit.safetensors"))
    with pytest.raises(CheckpointError, match=r"not the Wan 2.1 VAE; it looks like a Wan DiT .*wan_2.1_vae.safetensors"):
        WanVAE.load(tmp_path / "dit.safetensors")
    sd_vae = {"encoder.conv_in.weight": torch.zeros(4, 3, 3, 3), "decoder.conv_in.weight": torch.zeros(4, 4, 3, 3),
              "quant_conv.weight": torch.zeros(8, 8, 1, 1), "encoder.mid_block.attentions.0.to_q.weight": torch.zeros(4, 4)}
    save_file(sd_vae, str(tmp_path / "sdxl_vae.safetensors"))
    with pytest.raises(CheckpointError, match="VAE of another model family"):
        WanVAE.load(tmp_path / "sdxl_vae.safetensors")
    wan22 = {"encoder.conv1.weight": torch.zeros(4, 12, 3, 3, 3), "conv2.weight": torch.zeros(48, 48, 1, 1, 1),
             "decoder.upsamples.0.upsamples.0.residual.2.weight": torch.zeros(4, 4, 3, 3, 3)}
    save_file(wan22, str(tmp_path / "wan2.2_vae.safetensors"))
    with pytest.raises(CheckpointError, match="Wan 2.2 VAE"):
        WanVAE.load(tmp_path / "wan2.2_vae.safetensors")
    sd = original_state_dict(vae.model)
    del sd["decoder.upsamples.4.shortcut.weight"]
    sd["encoder.extra.weight"] = torch.zeros(2)
    save_file(sd, str(tmp_path / "broken.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing 1 keys: decoder.up_blocks.1.resnets.0.conv_shortcut.weight"):
        WanVAE.load(tmp_path / "broken.safetensors")  # the unknown extra alone would only be warned about


def test_cli_inspect_recognises_the_original_layout(vae, tmp_path, capsys):
    path = tmp_path / "wan_2.1_vae.safetensors"
    save_file(original_state_dict(vae.model), str(path))
    # what `python -m bindweave_core inspect --json FILE` runs (__main__ calls cli.main), in-process
    assert cli.main(["inspect", "--json", str(path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "vae" and report["layout"] == "wan-original" and report["family"] == "wan2.1-vae"
    assert report["config"]["base_dim"] == 8 and report["problems"] == []

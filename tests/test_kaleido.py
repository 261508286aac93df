"""Kaleido / R-RoPE: positions, clean reference tokens, SAT checkpoints, letterbox, schedule, pipeline, CLI.

Expected values are computed here from the formulas in docs/kaleido-rrope.md (which cites the official
code), never from the code under test.
"""

from __future__ import annotations

import argparse
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from test_text_encoder import to_wan
from test_vae import original_state_dict

from bindweave_core import cli
from bindweave_core import constants as C
from bindweave_core.config import PRESETS
from bindweave_core.dit import build_dit
from bindweave_core.dit.loading import load_dit
from bindweave_core.encoders.text import TextEncoder
from bindweave_core.encoders.vae import WanVAE
from bindweave_core.errors import CheckpointError, InputError
from bindweave_core.inspection import inspect_checkpoint
from bindweave_core.kaleido import (
    find_kaleido_bundle,
    kaleido_placement,
    kaleido_training_sigma,
    letterbox_white,
    prepare_kaleido_references,
    rrope_training_batch,
)
from bindweave_core.pipeline import BindWeavePipeline, GenerationSettings, defaults_for
from bindweave_core.sampling import GuidanceInputs, denoise, make_scheduler
from bindweave_core.video_io import read_video
from helpers import REPO, randomize_

TINY = PRESETS["tiny-kaleido"]
EXAMPLE = REPO / "examples/singleface_1/man.png"
SHIFT = 80  # config max_h / max_w


@pytest.fixture(scope="module")
def reference():
    return randomize_(build_dit(TINY), seed=31)


def inputs(n_refs: int = 2, frames: int = 2, h: int = 4, w: int = 6, seed: int = 32, timestep: float = 500.0):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, 16, frames, h, w, generator=g), timestep=torch.tensor([timestep]),
                encoder_hidden_states=torch.randn(1, 512, TINY.text_dim, generator=g),
                reference_latents=torch.randn(1, n_refs, 16, h, w, generator=g, dtype=torch.float32))


def run(model, kw):
    with torch.no_grad():
        return model(**kw)


def expected_positions(n_refs: int, frames: int, gh: int, gw: int) -> torch.Tensor:
    """Reference i patch (y, x) -> (i, 80 + y, 80 + x); then the video grid (t, y, x), raster order."""
    rows = [(i, SHIFT + y, SHIFT + x) for i in range(n_refs) for y in range(gh) for x in range(gw)]
    rows += [(t, y, x) for t in range(frames) for y in range(gh) for x in range(gw)]
    return torch.tensor(rows)


# ------------------------------------------------------------------------------------------ the DiT
@pytest.mark.parametrize("n_refs", [1, 2, 3])
def test_rotary_positions_follow_the_rrope_formula(reference, n_refs):
    seen = []
    original = reference.rotary_for
    reference.rotary_for = lambda key, positions, device: seen.append(original(key, positions, device)) or seen[-1]
    try:
        run(reference, inputs(n_refs, frames=3))
    finally:
        del reference.rotary_for
    cos, sin = seen[0]
    want_cos, want_sin = reference.rope(expected_positions(n_refs, 3, 2, 3))
    assert cos.shape[1] == (n_refs + 3) * 2 * 3
    torch.testing.assert_close(cos, want_cos, rtol=0, atol=0)
    torch.testing.assert_close(sin, want_sin, rtol=0, atol=0)


def test_reference_tokens_are_clean_and_their_outputs_dropped(reference):
    captured = []
    pre = reference.blocks[0].register_forward_pre_hook(lambda m, args: captured.append(args[0].clone()))
    heads = []
    post = reference.proj_out.register_forward_hook(lambda m, args, out: heads.append(out.clone()))
    try:
        a = inputs(2, seed=40, timestep=900.0)
        b = dict(a, hidden_states=torch.randn_like(a["hidden_states"]), timestep=torch.tensor([20.0]))
        out_a = run(reference, a)
        run(reference, b)
    finally:
        pre.remove()
        post.remove()
    n_ref = 2 * 2 * 3  # 2 references x (4/2) x (6/2) patches
    # the reference tokens entering the blocks are the patch embedding of the clean latents, whatever the noise/time
    refs = a["reference_latents"].flatten(0, 1).unsqueeze(2)
    clean = reference.patch_embedding(refs).flatten(2).transpose(1, 2).reshape(1, n_ref, -1)
    torch.testing.assert_close(captured[0][:, :n_ref], clean, rtol=0, atol=0)
    torch.testing.assert_close(captured[1][:, :n_ref], clean, rtol=0, atol=0)
    assert not torch.equal(captured[0][:, n_ref:], captured[1][:, n_ref:])
    # the output is the video part of the head only: unpatchify the last T*h*w tokens by hand
    assert out_a.shape == a["hidden_states"].shape
    video = heads[0][:, n_ref:].reshape(1, 2, 2, 3, 1, 2, 2, 16)  # b t h w pt ph pw c
    manual = video.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(1, 16, 2, 4, 6)
    torch.testing.assert_close(out_a, manual, rtol=0, atol=0)
    # ... and the references do condition it
    other = dict(a, reference_latents=torch.randn_like(a["reference_latents"]))
    assert not torch.allclose(run(reference, other), out_a)


# ------------------------------------------------------------------------------------------ SAT checkpoints
def to_sat(model) -> dict[str, torch.Tensor]:
    """The tiny DiT under SAT names (convert_ckpt_init_wan2sat.py's layout), written out here."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    used = set()

    def g(key):
        used.add(key)
        return sd[key]

    p = "model.diffusion_model."
    out = {}
    for leaf in ("weight", "bias"):
        out[f"{p}mixins.patch_embed.proj.{leaf}"] = g(f"patch_embedding.{leaf}")
        out[f"{p}text_embedding.0.{leaf}"] = g(f"condition_embedder.text_embedder.linear_1.{leaf}")
        out[f"{p}text_embedding.2.{leaf}"] = g(f"condition_embedder.text_embedder.linear_2.{leaf}")
        out[f"{p}time_embed.0.{leaf}"] = g(f"condition_embedder.time_embedder.linear_1.{leaf}")
        out[f"{p}time_embed.2.{leaf}"] = g(f"condition_embedder.time_embedder.linear_2.{leaf}")
        out[f"{p}adaln_projection.1.{leaf}"] = g(f"condition_embedder.time_proj.{leaf}")
        out[f"{p}mixins.final_layer.linear.{leaf}"] = g(f"proj_out.{leaf}")
    out[f"{p}mixins.final_layer.adaLN_modulation"] = g("scale_shift_table")
    for i in range(model.dit_config.num_layers):
        b, layer, ada = f"blocks.{i}.", f"{p}transformer.layers.{i}.", f"{p}mixins.adaln_layer."
        for leaf in ("weight", "bias"):
            out[f"{layer}attention.query_key_value.{leaf}"] = torch.cat(
                [g(f"{b}attn1.to_{x}.{leaf}") for x in "qkv"])
            out[f"{layer}attention.dense.{leaf}"] = g(f"{b}attn1.to_out.0.{leaf}")
            out[f"{layer}cross_attention.query.{leaf}"] = g(f"{b}attn2.to_q.{leaf}")
            out[f"{layer}cross_attention.key_value.{leaf}"] = torch.cat([g(f"{b}attn2.to_{x}.{leaf}") for x in "kv"])
            out[f"{layer}cross_attention.dense.{leaf}"] = g(f"{b}attn2.to_out.0.{leaf}")
            out[f"{layer}post_cross_attention_layernorm.{leaf}"] = g(f"{b}norm2.{leaf}")
            out[f"{layer}mlp.dense_h_to_4h.{leaf}"] = g(f"{b}ffn.net.0.proj.{leaf}")
            out[f"{layer}mlp.dense_4h_to_h.{leaf}"] = g(f"{b}ffn.net.2.{leaf}")
        out[f"{ada}query_layernorm_list.{i}.weight"] = g(f"{b}attn1.norm_q.weight")
        out[f"{ada}key_layernorm_list.{i}.weight"] = g(f"{b}attn1.norm_k.weight")
        out[f"{ada}cross_query_layernorm_list.{i}.weight"] = g(f"{b}attn2.norm_q.weight")
        out[f"{ada}cross_key_layernorm_list.{i}.weight"] = g(f"{b}attn2.norm_k.weight")
        out[f"{ada}adaLN_modulations.{i}"] = g(f"{b}scale_shift_table")
    assert used == set(sd), sorted(set(sd) - used)  # every tensor of the model has a SAT name
    return out


def write_sat_folder(model, root):
    """``model/latest`` + ``model/1/mp_rank_00_model_states.pt`` as DeepSpeed writes them (with RNG states)."""
    folder = root / "model"
    (folder / "1").mkdir(parents=True)
    (folder / "latest").write_text("1\n")
    state = {"module": to_sat(model), "iteration": 1, "np_rng_state": np.random.get_state(),
             "random_rng_state": random.getstate(), "torch_rng_state": torch.get_rng_state(),
             "param_shapes": [{"x": torch.Size([2, 3])}], "ds_version": "0.16.0"}
    torch.save(state, folder / "1" / "mp_rank_00_model_states.pt")
    return folder


def test_sat_checkpoint_loads_as_the_same_model(reference, tmp_path):
    folder = write_sat_folder(reference, tmp_path)
    save_file(to_sat(reference), str(tmp_path / "kaleido_sat.safetensors"))
    kw = inputs(3, seed=50)
    want = run(reference, kw)
    for path in (folder, folder / "1" / "mp_rank_00_model_states.pt", tmp_path, tmp_path / "kaleido_sat.safetensors"):
        model = load_dit(path, dtype=torch.float32)
        info = model.checkpoint_info
        assert info.layout == "sat" and model.dit_config.family == "kaleido", path
        assert model.dit_config == TINY and not info.problems()
        expected = reference.state_dict()
        for key, value in model.state_dict().items():
            assert torch.equal(value, expected[key]), (path, key)
        torch.testing.assert_close(run(model, kw), want, rtol=0, atol=1e-5)

    report = inspect_checkpoint(folder)
    assert (report["kind"], report["layout"], report["family"]) == ("dit", "sat", "kaleido")
    assert report["problems"] == [] and report["config"]["in_channels"] == 16


def test_unsafe_pickles_are_refused_with_a_clear_error(reference, tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"module": to_sat(reference), "args": argparse.Namespace(lr=1e-5)}, path)
    with pytest.raises(CheckpointError, match="argparse.Namespace.*unrestricted unpickling"):
        load_dit(path)
    (tmp_path / "broken.pt").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError, match="truncated"):
        load_dit(tmp_path / "broken.pt")
    (tmp_path / "other.ckpt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="not recognised: not a readable safetensors file"):
        load_dit(tmp_path / "other.ckpt")


def write_kaleido_download(root, dit) -> None:
    """A tiny Kaleido-14B-S2V folder: SAT model/, Wan2.1_VAE.pth, umt5-xxl/ (.pth + tokenizer)."""
    write_sat_folder(dit, root)
    torch.save(original_state_dict(WanVAE.tiny(0).model), root / "Wan2.1_VAE.pth")
    text = TextEncoder.tiny(0)
    (root / "umt5-xxl").mkdir()
    weights = {to_wan(k): v.bfloat16() for k, v in text.model.state_dict().items()
               if k != "encoder.embed_tokens.weight"}
    torch.save(weights, root / "umt5-xxl" / "models_t5_umt5-xxl-enc-bf16.pth")
    text.tokenizer.backend_tokenizer.save(str(root / "umt5-xxl" / "tokenizer.json"))


def test_bundled_vae_and_umt5_pth_files_load(tmp_path):
    write_kaleido_download(tmp_path, build_dit(TINY))
    bundle = find_kaleido_bundle(tmp_path)
    vae = WanVAE.load(bundle.vae, dtype=torch.float32)
    assert vae.checkpoint_info.layout == "wan-original"
    x = torch.rand(1, 3, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(vae.model.encode(x).latent_dist.mode(),
                                   WanVAE.tiny(0).model.encode(x).latent_dist.mode(), rtol=0, atol=0)
    text = TextEncoder.load(bundle.text_tokenizer, dtype=torch.float32)  # the folder: .pth + tokenizer.json
    assert text.model.checkpoint_info.layout == "wan-original"
    tiny = TextEncoder.tiny(0)
    with torch.no_grad():
        for p in tiny.model.parameters():
            p.copy_(p.bfloat16().float())
    prompts = ["a man walks in the park", "the dog"]
    torch.testing.assert_close(text.encode(prompts), tiny.encode(prompts), rtol=0, atol=1e-6)
    assert inspect_checkpoint(bundle.text_encoder)["kind"] == "umt5"


# ------------------------------------------------------------------------------------------ references
@pytest.mark.parametrize("size, canvas", [((300, 100), (64, 48)), ((20, 40), (64, 48)), ((64, 48), (64, 48)),
                                          ((115, 100), (1280, 720)), ((1750, 1000), (896, 512))])
def test_white_letterbox_placement_is_the_official_arithmetic(size, canvas):
    (w0, h0), (W, H) = size, canvas
    if w0 / h0 > W / H:
        new_w, new_h = W, int(W / (w0 / h0))
    else:
        new_w, new_h = int(H * (w0 / h0)), H
    place = kaleido_placement(size, W, H)
    assert (place.width, place.height, place.left, place.top) == (new_w, new_h, (W - new_w) // 2, (H - new_h) // 2)
    assert place.box[2] - place.box[0] == new_w


def test_white_letterbox_pixels_and_upscaling():
    image = Image.fromarray(np.random.default_rng(3).integers(0, 255, (10, 30, 3), dtype=np.uint8))  # 30x10
    canvas, mask, place = letterbox_white(image.convert("RGBA"), 64, 48)
    pixels = np.asarray(canvas)
    new_h = int(64 / 3.0)  # upscaled from 30 wide to the full 64
    top = (48 - new_h) // 2
    assert (place.width, place.height, place.left, place.top) == (64, new_h, 0, top)
    np.testing.assert_array_equal(pixels[top:top + new_h], np.asarray(image.resize((64, new_h), Image.LANCZOS)))
    assert (pixels[:top] == 255).all() and (pixels[top + new_h:] == 255).all()
    assert mask[top:top + new_h].all() and not mask[:top].any()
    # non-default alpha mode: transparent pixels become canvas white
    rgba = np.zeros((10, 30, 4), dtype=np.uint8)
    rgba[..., :3], rgba[:, :15, 3] = 40, 255
    cut, keep, _ = letterbox_white(Image.fromarray(rgba), 64, 48, use_alpha=True)
    cut = np.asarray(cut)
    assert (cut[~keep] == 255).all() and (cut[keep] == 40).all() and 0 < keep.sum() < 64 * new_h


def test_more_than_three_references_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(InputError, match="takes 1 to 3.*Remove 1"):
        prepare_kaleido_references([EXAMPLE] * 4, 64, 48)
    pipe = BindWeavePipeline.smoke(family="kaleido")
    with pytest.raises(InputError, match="takes 1 to 3"):
        pipe.generate([EXAMPLE] * 4, GenerationSettings(prompt="four people", width=64, height=48, num_frames=5,
                                                        steps=1, sampler="rf-euler"))
    rc = cli.main(["generate", "--smoke", "--family", "kaleido", *(["--ref", str(EXAMPLE)] * 4), "--prompt", "x",
                   "--out", str(tmp_path / "four.mp4")])
    assert rc == 2 and "takes 1 to 3" in capsys.readouterr().err and not (tmp_path / "four.mp4").exists()


# ------------------------------------------------------------------------------------------ sampling
@pytest.mark.parametrize("steps", [50, 4])
def test_schedule_is_the_official_hunyuan_rf_schedule(steps):
    u = np.linspace(0, 1, steps + 1)  # make_hunyuan_timesteps(0, steps, shift_scale=7), mode "normal"
    official = torch.tensor(1 - u / (7 + u - 7 * u), dtype=torch.float32)
    scheduler = make_scheduler("rf-euler", shift=C.KALEIDO_SHIFT)
    scheduler.set_timesteps(steps)
    assert official[0] == 1 and official[-1] == 0
    torch.testing.assert_close(scheduler.sigmas, official, rtol=0, atol=0)
    torch.testing.assert_close(scheduler.timesteps, official[:-1] * 1000, rtol=0, atol=0)  # c_noise = 1000 sigma

    # the sampler is x <- x + (sigma_next - sigma) * v with guidance uncond + 6 (cond - uncond)
    x0 = torch.randn(1, 16, 2, 4, 4)
    predict = lambda x, t, which: torch.cat([x * 0.1 + t.view(-1, 1, 1, 1, 1) / 1000, x * 0.3]) if which == "both" \
        else None  # noqa: E731
    got = denoise(GuidanceInputs(predict=predict, guidance=6.0), x0.clone(), steps=steps, sampler="rf-euler",
                  shift=C.KALEIDO_SHIFT)
    x = x0.clone()
    for i in range(steps):
        cond, uncond = x * 0.1 + official[i], x * 0.3
        x = x + (official[i + 1] - official[i]) * (uncond + 6.0 * (cond - uncond))
    torch.testing.assert_close(got, x, rtol=1e-6, atol=1e-6)


def test_family_defaults():
    bindweave = defaults_for("bindweave")
    plain = GenerationSettings(prompt="x")
    assert all(getattr(plain, k) == v for k, v in bindweave.items())  # GenerationSettings stays BindWeave's
    kaleido = defaults_for("kaleido")
    assert (kaleido["width"], kaleido["height"], kaleido["num_frames"], kaleido["fps"]) == (896, 512, 81, 16)
    assert (kaleido["steps"], kaleido["guidance"], kaleido["shift"], kaleido["sampler"]) == (50, 6.0, 7.0, "rf-euler")
    assert kaleido["negative_prompt"].startswith("色调艳丽") and kaleido["negative_prompt"].endswith("倒着走")
    with pytest.raises(InputError, match="unknown model family"):
        defaults_for("phantom")


# ------------------------------------------------------------------------------------------ pipeline / training
def test_smoke_pipeline_conditions_on_text_only_with_the_same_references():
    pipe = BindWeavePipeline.smoke(family="kaleido")
    calls = []
    dit = pipe.component("dit")
    hook = dit.register_forward_hook(lambda m, args, kwargs, out: calls.append((args, kwargs)), with_kwargs=True)
    try:
        result = pipe.generate([EXAMPLE, EXAMPLE], GenerationSettings(
            prompt="a man waves", **{**defaults_for("kaleido"), "width": 64, "height": 48, "num_frames": 5,
                                     "steps": 2}))
    finally:
        hook.remove()
    assert result.frames.shape == (5, 48, 64, 3) and pipe._components["clip_vision"] is None
    args, kwargs = calls[0]
    refs = kwargs["reference_latents"]
    assert refs.shape == (2, 2, 16, 6, 8) and torch.equal(refs[0], refs[1])  # cond and uncond: same references
    assert not torch.equal(args[2][0], args[2][1])  # ... and different text (prompt vs negative prompt)
    assert kwargs["condition"] is None and kwargs["planner_states"] is None and args[3] is None  # no slots/CLIP


def test_training_batch_keeps_references_clean():
    g = torch.Generator().manual_seed(7)
    x0, noise = torch.randn(2, 16, 3, 4, 6, generator=g), torch.randn(2, 16, 3, 4, 6, generator=g)
    refs = torch.randn(1, 3, 16, 4, 6, generator=g)
    sigma = torch.tensor([0.25, 0.9])
    kwargs, target = rrope_training_batch(x0, refs, torch.zeros(2, 512, 32), noise, sigma)
    torch.testing.assert_close(kwargs["hidden_states"][1], 0.1 * x0[1] + 0.9 * noise[1])
    torch.testing.assert_close(kwargs["timestep"], torch.tensor([250.0, 900.0]))
    assert torch.equal(kwargs["reference_latents"][1], refs[0]) and torch.equal(target, noise - x0)
    with pytest.raises(InputError, match="do not fit"):
        rrope_training_batch(x0, refs[..., :2], torch.zeros(2, 512, 32), noise, sigma)
    # sigmoid(N(0,1)) then e^mu / (e^mu + 1/s - 1), mu linear in patches per frame (256 -> 0.5, 4096 -> 1.15)
    s = kaleido_training_sigma(1000, 64, 112, generator=torch.Generator().manual_seed(1))
    raw = torch.sigmoid(torch.randn(1000, generator=torch.Generator().manual_seed(1)))
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (64 * 112 / 4 - 256)
    torch.testing.assert_close(s, np.exp(mu) / (np.exp(mu) + 1 / raw - 1))
    assert 0 < s.min() and s.max() < 1


# ------------------------------------------------------------------------------------------ CLI
def test_cli_smoke_run_in_kaleido_mode_writes_the_video(tmp_path):
    out = tmp_path / "kaleido.mp4"
    rc = cli.main(["generate", "--smoke", "--family", "kaleido", "--ref", str(EXAMPLE), "--ref", str(EXAMPLE),
                   "--prompt", "a man waves", "--out", str(out), "--width", "80", "--height", "48", "--frames", "5",
                   "--steps", "2", "--seed", "3"])
    assert rc == 0
    frames, fps = read_video(out)
    assert frames.shape == (5, 48, 80, 3) and fps == 16
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["family"] == "kaleido" and sidecar["models"] == {"smoke": True}
    assert {k: sidecar["settings"][k] for k in ("sampler", "shift", "guidance", "negative_prompt")} == {
        "sampler": "rf-euler", "shift": 7.0, "guidance": 6.0, "negative_prompt": C.KALEIDO_NEGATIVE_PROMPT}


def test_cli_runs_a_kaleido_download_folder(tmp_path):
    root = tmp_path / "Kaleido-14B-S2V"
    root.mkdir()
    write_kaleido_download(root, randomize_(build_dit(TINY), seed=5, scale=0.05))
    out = tmp_path / "out.mp4"
    rc = cli.main(["generate", "--kaleido-dir", str(root), "--ref", str(EXAMPLE), "--prompt", "a man waves",
                   "--out", str(out), "--width", "64", "--height", "48", "--frames", "5", "--steps", "2"])
    assert rc == 0 and read_video(out)[0].shape == (5, 48, 64, 3)
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["family"] == "kaleido" and set(sidecar["models"]) == {"dit", "vae", "text_encoder"}


def test_real_size_sat_header_is_kaleido_14b(tmp_path):
    """Full-size shapes (headers only, no data): the SAT names map onto the kaleido-14b preset."""
    from bindweave_core.checkpoints.safetensors_io import TensorInfo
    from bindweave_core.checkpoints.sat_layout import map_sat_keys
    from bindweave_core.dit.loading import infer_config

    full = PRESETS["kaleido-14b"]
    sat = to_sat(build_dit(full, device="meta"))
    infos = {k: TensorInfo(tmp_path / "mp_rank_00_model_states.pt", k, torch.bfloat16, tuple(v.shape))
             for k, v in sat.items()}
    tensors, ignored, foreign = map_sat_keys(infos, "model.diffusion_model.")
    assert not ignored and not foreign
    assert tensors["blocks.39.attn1.to_v.weight"].part == (10240, 15360)
    assert infer_config(tensors, {}).replace(family="kaleido") == full

"""The LoRA trainer on the tiny smoke models (CPU): data checks, cache, objective, loss, resume, export."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from bindweave_core.errors import InputError
from bindweave_core.lora import apply_lora, load_lora
from bindweave_core.smoke import smoke_dit
from training.augment import augment_reference
from training.cache import FeatureCache, load_entry
from training.config import TrainConfig
from training.dataset import BatchOrder, choose_bucket, frame_indices, load_dataset
from training.make_example_dataset import make_example_dataset, render_video
from training.model import add_lora, encoder_identities, export_lora, train_connector, trainable_state
from training.objective import flow_matching_loss, rrope_branch, shifted_sigmas, slot_branch
from training.train_lora import main, read_losses, run

SIZE, FRAMES = 32, 5


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny models' ops are far too small for a second thread (which only waits on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def config(tmp, data, cache_dir, **sections) -> TrainConfig:
    raw = {"model": {"smoke": True}, "data": {"path": str(data), "num_frames": FRAMES, "buckets": [[SIZE, SIZE]]},
           "augment": {"variants": 2}, "cache": {"dir": str(cache_dir)},
           "lora": {"rank": 4, "alpha": 4},
           "train": {"output_dir": str(tmp), "mixed_precision": "no", "tensorboard": False, "save_dtype": "float32",
                     "checkpoint_every": 0, "learning_rate": 3e-3, "gradient_checkpointing": False}}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return TrainConfig.from_dict(raw)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """3 good samples (one with a masked RGBA second reference) + 4 bad ones, as JSONL."""
    root = tmp_path_factory.mktemp("data")
    return make_example_dataset(root, samples=3, width=SIZE, height=SIZE, frames=9, layout="jsonl", with_bad=True)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data, cache_dir):
    """One run of 30 steps with an easy, fixed target (one noise level, the same noise), connector trained,
    previews of two prompts every 15 steps."""
    out = tmp_path_factory.mktemp("run")
    torch.set_num_threads(1)  # module fixtures run before the autouse one
    cfg = config(out, data, cache_dir, objective={"fixed_sigma": 0.5, "fixed_noise": True},
                 lora={"train_connector": True}, train={"max_steps": 30},
                 validation={"every": 15, "steps": 2, "prompts": [
                     {"prompt": "a blue square", "references": [str(data.parent / "sample_000" / "ref1.png")]}]})
    return cfg, run(cfg)


# ------------------------------------------------------------------------------------------ data
def test_bad_samples_are_reported_by_path_and_reason_and_training_uses_the_rest(trained, data):
    cfg, result = trained
    root = data.parent
    bad = {b.path: b.reason for b in result.report.bad}
    assert bad.keys() == {str(root / "bad_unreadable_video/video.mp4"), str(root / "bad_too_short/video.mp4"),
                          str(root / "bad_missing_reference/ref1.png"), str(root / "bad_mask_size/ref1_mask.png")}
    assert "cannot read this video" in bad[str(root / "bad_unreadable_video/video.mp4")]
    assert "too few frames: 2 at 16 fps" in bad[str(root / "bad_too_short/video.mp4")]
    assert bad[str(root / "bad_missing_reference/ref1.png")] == "missing reference image"
    assert "bad mask: 8x8 but its image ref1.png is 16x16" in bad[str(root / "bad_mask_size/ref1_mask.png")]
    assert len(result.report.good) == 3 and result.step == 30
    report = json.loads((cfg.output_dir / "dataset_report.json").read_text())
    assert len(report["good"]) == 3 and len(report["bad"]) == 4


def test_folder_layout_and_frame_sampling(tmp_path):
    root = make_example_dataset(tmp_path, samples=2, width=48, height=32, frames=9)
    report = load_dataset(root, 5, 8, [[32, 32], [48, 32]])
    assert [s.name for s in report.good] == [str(tmp_path / "sample_000"), str(tmp_path / "sample_001")]
    s = report.good[1]
    assert s.bucket == (48, 32) and s.source_frames == 9 and len(s.references) == 2
    assert s.references[1].mask == tmp_path / "sample_001/ref2_mask.png"
    assert frame_indices(30, 30.0, 5, 16) == [0, 2, 4, 6, 8]  # nearest source frame at 16 fps
    assert frame_indices(9, 16.0, 5, 8) == [0, 2, 4, 6, 8]
    assert frame_indices(8, 16.0, 5, 8) is None  # 0.5 s needed, 0.5 s minus a frame given
    assert choose_bucket(1920, 1080, [[832, 480], [480, 832], [624, 624]]) == (832, 480)
    assert choose_bucket(700, 720, [[832, 480], [480, 832], [624, 624]]) == (624, 624)


def test_batch_order_is_a_function_of_seed_and_step():
    order = BatchOrder([(32, 32)] * 5 + [(48, 32)] * 3, batch_size=2, seed=7)
    assert order.per_process == 5  # 3 + 2 batches per epoch
    epoch0 = [order.batch(i) for i in range(5)]
    assert sorted(i for b in epoch0 for i in b) == list(range(8))
    assert all(len({(32, 32) if i < 5 else (48, 32) for i in b}) == 1 for b in epoch0)  # one bucket per batch
    again = BatchOrder([(32, 32)] * 5 + [(48, 32)] * 3, batch_size=2, seed=7)
    assert [again.batch(i) for i in (7, 3, 12)] == [order.batch(i) for i in (7, 3, 12)]
    two = [BatchOrder([(32, 32)] * 8, 1, 0, rank=r, world=2).epoch_batches(0) for r in (0, 1)]
    assert sorted(b[0] for b in two[0] + two[1]) == list(range(8))


def test_reference_augmentation():
    image = Image.new("RGB", (40, 20), (200, 30, 30))
    a, mask_a = augment_reference(image, None, (32, 32), random.Random(1), rotation=30, scale=(0.5, 0.8))
    b, mask_b = augment_reference(image, None, (32, 32), random.Random(1), rotation=30, scale=(0.5, 0.8))
    assert a.tobytes() == b.tobytes() and mask_a.tobytes() == mask_b.tobytes()  # seeded
    assert max(a.size) < 32 and a.size == mask_a.size  # smaller than the plain letterbox (32 x 16)
    assert mask_a.getpixel((0, 0)) == 0 and mask_a.getpixel((a.size[0] // 2, a.size[1] // 2)) == 255


# ------------------------------------------------------------------------------------------ cache
def test_cache_is_reused_and_invalidated_by_sample_or_model_changes(tmp_path, data, cache_dir, trained):
    cfg = config(tmp_path, data, cache_dir)
    report = load_dataset(data, FRAMES, 16, [[SIZE, SIZE]])
    cache = FeatureCache(cfg)
    first = cache.ensure(report.good)
    assert first.encoded == 0 and len(first.entries) == 3  # filled by the training run, same settings
    keys = [cache.sample_key(s) for s in report.good]

    entry = load_entry(first.entries[report.good[1].name], variant=1)
    assert entry["latents"].shape == (1, 16, 2, 4, 4) and entry["text"].shape == (1, 512, 32)
    assert entry["clip"].shape == (1, 1028, 32) and entry["slots"].shape == (1, 20, 4, 4, 4)
    assert entry["planner"].shape[-1] == 64 and entry["num_references"] == 2

    # a changed prompt, a re-encoded video, another model or other augmentation: new keys
    s0 = report.good[0]
    s0.prompt += " slowly"
    assert cache.sample_key(s0) != keys[0]
    s0.prompt = s0.prompt[: -len(" slowly")]
    assert cache.sample_key(s0) == keys[0]
    other_model = FeatureCache(config(tmp_path, data, cache_dir, model={"smoke_seed": 1}))
    assert not set(other_model.sample_key(s) for s in report.good) & set(keys)
    other_aug = FeatureCache(config(tmp_path, data, cache_dir, augment={"variants": 2, "rotation": 5.0}))
    assert not set(other_aug.sample_key(s) for s in report.good) & set(keys)

    copy_root = tmp_path / "copy"
    copy = make_example_dataset(copy_root, samples=2, width=SIZE, height=SIZE, frames=9, layout="jsonl")
    copy_cfg = config(tmp_path, copy, tmp_path / "cache2", augment={"variants": 1})
    samples = load_dataset(copy, FRAMES, 16, [[SIZE, SIZE]]).good
    assert FeatureCache(copy_cfg).ensure(samples).encoded == 2
    video = samples[0].video
    from bindweave_core.video_io import write_mp4

    write_mp4(render_video("square", (0, 0, 255), (torch.zeros(3).numpy(), torch.full((3,), 255.0).numpy()),
                           SIZE, SIZE, 9, 1), video, fps=16)
    samples = load_dataset(copy, FRAMES, 16, [[SIZE, SIZE]]).good
    again = FeatureCache(copy_cfg).ensure(samples)
    assert again.encoded == 1 and len(again.entries) == 2  # only the changed sample


def test_file_model_identity_follows_the_file(tmp_path):
    from bindweave_core.pipeline import Lazy

    weights = tmp_path / "vae.safetensors"
    weights.write_bytes(b"x" * 10)
    cfg = TrainConfig.from_dict({"model": {"dit": "d", "vae": str(weights), "text_encoder": "t"},
                                 "data": {"path": "p"}})
    encoders = {"vae": Lazy(lambda: None), "text_encoder": None, "clip_vision": None, "planner": None}
    before = encoder_identities(cfg, encoders)["vae"]
    assert encoder_identities(cfg, encoders)["vae"] == before
    weights.write_bytes(b"y" * 11)
    assert encoder_identities(cfg, encoders)["vae"] != before


def test_cache_only_command_and_config_errors(tmp_path, data, cache_dir, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(config(tmp_path, data, cache_dir).to_dict()))  # JSON is YAML
    assert main(["--config", str(path), "--cache-only"]) == 0
    assert not (tmp_path / "loss.csv").exists()
    assert main(["--config", str(path), "--set", "lora.rnak=4"]) == 2
    assert main(["--config", str(path), "--set", "data.num_frames=6"]) == 2


# ------------------------------------------------------------------------------------------ objective
class Recorder(torch.nn.Module):
    """Stands in for the DiT: returns a constant and remembers its inputs."""

    def forward(self, x, t, text, clip, **kw):
        self.x, self.t, self.kw = x, t, kw
        return torch.full_like(x, 0.25)


def test_flow_matching_objective():
    assert torch.allclose(shifted_sigmas(torch.tensor([0.0, 0.5, 1.0]), 5.0), torch.tensor([0.0, 2.5 / 3, 1.0]))
    assert torch.equal(shifted_sigmas(torch.tensor([0.3]), 1.0), torch.tensor([0.3]))
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 16, 2, 4, 4, generator=g), torch.randn(2, 16, 2, 4, 4, generator=g)
    sigma = torch.tensor([0.2, 0.9])
    item = {"text": torch.randn(1, 512, 32), "planner": torch.randn(1, 5, 64), "clip": torch.randn(1, 1028, 32),
            "slots": torch.randn(1, 20, 4, 4, 4), "num_references": 2}
    cfg = smoke_dit(0).dit_config
    branch = slot_branch(item, torch.randn(1, 20, 2, 4, 4), cfg)
    assert branch.condition.shape == (1, 20, 6, 4, 4)  # 4 slots then the 2 video frames
    dit = Recorder()
    loss = flow_matching_loss(dit, x0, [branch, branch], sigma, noise, device="cpu", dtype=torch.float32)
    s = sigma.view(2, 1, 1, 1, 1)
    torch.testing.assert_close(dit.x, (1 - s) * x0 + s * noise)
    torch.testing.assert_close(dit.t, sigma * 1000)
    torch.testing.assert_close(loss, torch.mean((0.25 - (noise - x0)) ** 2))
    # R-RoPE: the clean reference latents as sequence references, text only for a Kaleido DiT
    item["ref_latents"] = torch.randn(1, 2, 16, 4, 4)
    rope = rrope_branch(item, None, smoke_dit(0, "tiny-kaleido").dit_config)
    assert rope.condition is None and rope.planner_states is None and rope.clip_tokens is None
    assert rope.reference_latents is item["ref_latents"]


def test_rrope_mode_trains_a_kaleido_dit(tmp_path, data):
    """The R-RoPE hook end to end: Kaleido references (white letterbox, no CLIP/planner) cached,
    Kaleido's sigma draw, a preview through the core pipeline."""
    cfg = config(tmp_path, data, tmp_path / "cache", model={"family": "kaleido"}, train={"max_steps": 3},
                 validation={"every": 3, "steps": 1})
    result = run(cfg)
    assert result.step == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    entry = load_entry(FeatureCache(cfg).collect(result.report.good).entries[result.report.good[1].name], 1)
    assert entry["ref_latents"].shape == (1, 2, 16, 4, 4) and "slots" not in entry and "planner" not in entry
    assert (tmp_path / "samples" / "step-000003.mp4").exists()
    assert load_lora(result.lora_path).training_config["model"]["family"] == "kaleido"


# ------------------------------------------------------------------------------------------ model
def _dit_inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, 16, 2, 4, 4, generator=g), timestep=torch.tensor([420.0]),
                encoder_hidden_states=torch.randn(1, 512, 32, generator=g),
                encoder_hidden_states_image=torch.randn(1, 1028, 32, generator=g),
                planner_states=torch.randn(1, 6, 64, generator=g), condition=torch.randn(1, 20, 6, 4, 4, generator=g))


def test_fp8_base_peft_lora_trains_and_checkpointing_gives_the_same_gradients(tmp_path):
    from bindweave_core.checkpoints.writers import atomic_save_file
    from bindweave_core.dit.loading import CONFIG_METADATA_KEY, load_dit
    from bindweave_core.fp8 import FP8Linear

    base = smoke_dit(0)
    path = atomic_save_file(dict(base.state_dict()), tmp_path / "dit.safetensors",
                            metadata={CONFIG_METADATA_KEY: base.dit_config.to_json()})
    cfg = TrainConfig.from_dict({"model": {"smoke": True}, "data": {"path": "x"}, "lora": {"rank": 4, "init": "gaussian"}})
    grads = {}
    for fp8, checkpointing in ((True, False), (True, True), (False, True)):
        torch.manual_seed(0)
        dit = load_dit(path, dtype=torch.float32, weight_format="fp8" if fp8 else "default")
        add_lora(dit, cfg)
        q = dit.blocks[0].attn1.to_q
        assert isinstance(q.base_layer, FP8Linear) == fp8 and not q.base_layer.weight.requires_grad
        assert q.lora_A["default"].weight.dtype == torch.float32  # adapters stay float32 on an fp8 base
        with torch.no_grad():
            for name, p in dit.named_parameters():
                if "lora_B" in name:
                    p.normal_(generator=torch.Generator().manual_seed(len(name)))
        if checkpointing:
            dit.enable_gradient_checkpointing()
        dit.train()
        dit(**_dit_inputs()).pow(2).mean().backward()
        grads[fp8, checkpointing] = {n: p.grad for n, p in dit.named_parameters() if p.requires_grad}
    plain, ckpt = grads[True, False], grads[True, True]
    assert len(plain) == 24 * 2 and all(g.abs().sum() > 0 for g in plain.values())
    assert all(torch.equal(plain[n], ckpt[n]) for n in plain)  # recomputation changes nothing
    assert grads[False, True].keys() == plain.keys()


# ------------------------------------------------------------------------------------------ training
def test_loss_falls(trained):
    _, result = trained
    losses = result.losses
    assert len(losses) == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)


def test_saved_files_are_readable_by_other_users(trained):
    """safetensors 0.8 creates 0600 files; ours follow the umask like any other file (0644 under 022), so a
    ComfyUI running as another user can load the LoRA."""
    from bindweave_core.atomic import current_umask

    cfg, result = trained
    want = 0o666 & ~current_umask()
    written = [result.lora_path, *sorted(Path(cfg.output_dir).rglob("*.safetensors"))]
    assert len(written) >= 2
    assert {str(p): os.stat(p).st_mode & 0o777 for p in written} == {str(p): want for p in written}


def test_saved_lora_reproduces_the_trained_model(trained):
    cfg, result = trained
    lora = load_lora(result.lora_path)
    meta_cfg = lora.training_config
    assert meta_cfg["lora"]["rank"] == 4 and meta_cfg["train"]["max_steps"] == 30
    assert len(lora.layers) == 24 and set(lora.diffs) == {
        f"condition_embedder.text_projector.linear_{i}.{w}" for i in (1, 2) for w in ("weight", "bias")}
    trained_dit = result.model.eval()
    inputs = _dit_inputs(5)
    with torch.no_grad():
        want = trained_dit(**inputs)
        fresh = smoke_dit(cfg.model.smoke_seed)
        base = fresh(**inputs)
        apply_lora(fresh, lora)
        merged = fresh(**inputs)
    assert (want - base).abs().max() > 1e-2  # the LoRA does something
    torch.testing.assert_close(merged, want, rtol=0, atol=1e-5)
    with torch.no_grad():
        hooked = smoke_dit(cfg.model.smoke_seed)
        apply_lora(hooked, lora, mode="hooks")
        torch.testing.assert_close(hooked(**inputs), want, rtol=0, atol=1e-5)


def test_preview_videos_and_logs(trained):
    from bindweave_core.video_io import read_video

    cfg, result = trained
    out = cfg.output_dir
    for step in (15, 30):
        frames, fps = read_video(out / "samples" / f"step-{step:06d}.mp4")
        assert frames.shape == (FRAMES, SIZE, SIZE, 3) and fps == 16
        second, _ = read_video(out / "samples" / f"step-{step:06d}-2.mp4")  # validation.prompts
        assert second.shape == frames.shape and (second.astype(int) - frames).any()
    rows = read_losses(out / "loss.csv")
    assert [r[0] for r in rows] == list(range(1, 31)) and [r[1] for r in rows] == result.losses
    assert (out / "checkpoints" / "step-000030" / "trainable.safetensors").exists()


def test_resume_is_bit_identical(tmp_path, data, cache_dir):
    """Stop at step 3, resume to 6: the same LoRA and losses as 6 steps in one go (dropout, accumulation,
    gradient checkpointing, random sigmas/noise and reference variants, a cosine schedule with warmup)."""
    sections = dict(lora={"dropout": 0.1}, train={"max_steps": 6, "gradient_accumulation_steps": 2,
                                                  "lr_scheduler": "cosine", "lr_warmup_steps": 2,
                                                  "gradient_checkpointing": True})
    straight = run(config(tmp_path / "straight", data, cache_dir, **sections))
    part = run(config(tmp_path / "split", data, cache_dir, **sections), stop_at_step=3)
    assert part.interrupted and part.step == 3 and part.lora_path is None
    rest = run(config(tmp_path / "split", data, cache_dir, **sections), resume="latest")
    assert rest.step == 6 and len(rest.losses) == 3
    assert read_losses(tmp_path / "straight/loss.csv") == read_losses(tmp_path / "split/loss.csv")
    a = load_file(str(tmp_path / "straight/checkpoints/step-000006/trainable.safetensors"))
    b = load_file(str(tmp_path / "split/checkpoints/step-000006/trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert straight.losses[3:] == rest.losses and len(set(straight.losses)) == 6
    la, lb = load_lora(straight.lora_path), load_lora(rest.lora_path)
    assert all(torch.equal(la.layers[k].up, lb.layers[k].up) for k in la.layers)
    assert sorted(os.listdir(tmp_path / "split/checkpoints")) == ["step-000003", "step-000006"]


def test_export_matches_peft_state():
    cfg = TrainConfig.from_dict({"model": {"smoke": True}, "data": {"path": "x"}, "lora": {"rank": 2, "alpha": 6}})
    dit = smoke_dit(0).requires_grad_(False)
    add_lora(dit, cfg)
    base = train_connector(dit)
    with torch.no_grad():
        dit.condition_embedder.text_projector.linear_1.bias.add_(1.0)
    lora = export_lora(trainable_state(dit), 6.0, base)
    layer = lora.layers["blocks.1.ffn.net.2"]
    assert layer.rank == 2 and layer.scale == 3.0
    assert torch.equal(layer.down, dit.blocks[1].ffn.net[2].lora_A["default"].weight)
    torch.testing.assert_close(lora.diffs["condition_embedder.text_projector.linear_1.bias"], torch.ones(32))


# ------------------------------------------------------------------------------------------ checks before caching
def _entries(cache) -> list:
    return sorted(p.name for p in (cache / "samples").glob("*")) if (cache / "samples").exists() else []


def test_mixed_precision_no_from_yaml(tmp_path, data):
    path = tmp_path / "c.yaml"
    path.write_text(f"model: {{smoke: true}}\ndata: {{path: {data}}}\ntrain: {{mixed_precision: no}}\n")
    assert TrainConfig.from_yaml(path).train.mixed_precision == "no"  # YAML reads `no` as False


@pytest.mark.parametrize("yaml_value, message", [
    ("train: {learning_rate: .nan}", "train.learning_rate: nan is not a finite number"),
    ("train: {learning_rate: nan}", "train.learning_rate: 'nan' is not a finite number"),
    ("train: {learning_rate: .inf}", "train.learning_rate: inf is not a finite number"),
    ("train: {lr_scheduler: cosine_annealing}", "unknown train.lr_scheduler 'cosine_annealing'; diffusers' "
                                                "schedulers are linear, cosine,"),
    ("lora: {dropout: 2}", "lora.dropout is the fraction of LoRA inputs zeroed, from 0 (off) up to but not "
                           "including 1; got 2.0"),
    ("lora: {dropout: -0.1}", "lora.dropout is the fraction"),
    ("lora: {alpha: 0}", "lora.alpha must be positive"),
    ("train: {adam_beta2: 1.5}", "adam_beta1 and adam_beta2 must be in [0, 1)"),
    ("train: {max_steps: 1.5}", "train.max_steps: 1.5 is not a valid int"),
    ("train: {learning_rate: true}", "train.learning_rate: True is not a valid float"),
    ("validation: {guidance: .nan}", "validation.guidance: nan is not a finite number"),
    ("validation: {steps: 0}", "validation.steps: steps must be a whole number from 1 to 1000, got 0"),
    ("validation: {sampler: dpm}", "validation.sampler: unknown sampler 'dpm'"),
    ("validation: {width: 100}", "validation.width: width must be a multiple of 16 from 16 to 16384"),
    ("validation: {shift: 0}", "validation.shift: shift must be a number from 0.1 to 100"),
])
def test_bad_values_are_refused_when_the_config_is_read(tmp_path, data, yaml_value, message):
    """Checked as the YAML is read: nothing (no feature cache, no model) has run yet."""
    path = tmp_path / "c.yaml"
    path.write_text(f"model: {{smoke: true}}\ndata: {{path: {data}}}\n{yaml_value}\n")
    with pytest.raises(InputError, match=re.escape(message)):
        TrainConfig.from_yaml(path)


def test_lr_scheduler_names_are_diffusers_own():
    from diffusers.optimization import SchedulerType

    from training.config import LR_SCHEDULERS

    assert set(LR_SCHEDULERS) == {t.value for t in SchedulerType}


@pytest.mark.parametrize("change, message", [
    ({"lora": {"targets": ["attn1.to_qq"]}}, "'attn1.to_qq' is no linear layer"),
    ({"train": {"optimizer": "adamw8bit"}}, "adamw8bit"),
    ({"train": {"output_dir": "/proc/bindweave-test/out"}}, "train.output_dir /proc/bindweave-test/out is not writable"),
    ({"train": {"blocks_to_swap": 2, "gradient_checkpointing": True}}, "the DiT has 2 blocks"),
    ({"train": {"blocks_to_swap": 1}}, "blocks_to_swap needs train.gradient_checkpointing"),
])
def test_bad_config_fails_before_caching(tmp_path, data, change, message):
    cache = tmp_path / "cache"
    with pytest.raises(InputError, match=re.escape(message)):
        run(config(tmp_path / "out", data, cache, **change))
    assert _entries(cache) == []


def test_output_folder_that_is_a_file(tmp_path, data):
    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(InputError, match="train.output_dir .*/out is a file, not a folder"):
        run(config(tmp_path / "out", data, tmp_path / "cache"))


@pytest.mark.parametrize("package, option, message", [
    ("peft", {}, "the trainer needs the peft package"),
    ("tensorboard", {"tensorboard": True}, "train.tensorboard: true needs the tensorboard package"),
    ("wandb", {"wandb": True}, "train.wandb: true needs the wandb package"),
])
def test_missing_packages_are_named(tmp_path, data, monkeypatch, package, option, message):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))
    with pytest.raises(InputError, match=re.escape(message)):
        run(config(tmp_path / "out", data, tmp_path / "cache", train=option))
    assert _entries(tmp_path / "cache") == []


def _checkpoint_copy(trained, tmp_path) -> Path:
    cfg, _ = trained
    out = tmp_path / "out"
    shutil.copytree(cfg.output_dir / "checkpoints" / "step-000030", out / "checkpoints" / "step-000030")
    return out / "checkpoints" / "step-000030"


@pytest.mark.parametrize("damage, change, message", [
    (None, {"lora": {"rank": 8, "train_connector": True}}, "rank: checkpoint 4, this config 8"),
    (None, {"lora": {"targets": ["attn1.to_q"], "train_connector": True}}, "targets: checkpoint"),
    (None, {"model": {"smoke_seed": 3}, "lora": {"train_connector": True}}, "base_model: checkpoint 'smoke (seed 0)'"),
    ("truncate trainable.safetensors", {"lora": {"train_connector": True}}, "trainable.safetensors is damaged"),
    ("truncate optimizer.bin", {"lora": {"train_connector": True}}, "optimizer.bin is damaged or truncated"),
    ("delete scheduler.bin", {"lora": {"train_connector": True}}, "scheduler.bin is missing"),
    ("delete run.json", {"lora": {"rank": 8, "train_connector": True}}, "its LoRA has rank [4], this config lora.rank 8"),
])
def test_bad_checkpoints_are_named_before_caching(trained, tmp_path, data, damage, change, message):
    folder = _checkpoint_copy(trained, tmp_path)
    if damage:
        verb, name = damage.split()
        if verb == "delete":
            (folder / name).unlink()
        else:
            blob = (folder / name).read_bytes()
            (folder / name).write_bytes(blob[: len(blob) // 2])
    cache = tmp_path / "cache"
    with pytest.raises(InputError, match=re.escape(message)):
        run(config(tmp_path / "out", data, cache, **change), resume="latest")
    assert _entries(cache) == []


# ------------------------------------------------------------------------------------------ memory options
def test_block_swap_and_activation_offload_train_the_same_lora(tmp_path, data, cache_dir):
    """Streaming a DiT block from CPU memory, or keeping the checkpointed activations there, changes where
    tensors live, not the arithmetic: the same losses and LoRA as the plain run (<= 1e-5)."""
    common = dict(lora={"dropout": 0.1}, train={"max_steps": 3, "gradient_checkpointing": True})
    results = {}
    for name, extra in (("plain", {}), ("swap", {"blocks_to_swap": 1}), ("offload", {"activation_offload": True})):
        sections = {k: dict(v) for k, v in common.items()}
        sections["train"].update(extra)
        results[name] = run(config(tmp_path / name, data, cache_dir, **sections))
    plain = load_file(str(tmp_path / "plain/checkpoints/step-000003/trainable.safetensors"))
    for name in ("swap", "offload"):
        assert results[name].losses == pytest.approx(results["plain"].losses, abs=1e-5)
        other = load_file(str(tmp_path / name / "checkpoints/step-000003/trainable.safetensors"))
        assert other.keys() == plain.keys()
        assert max((other[k] - plain[k]).abs().max().item() for k in plain) <= 1e-5
    assert getattr(results["swap"].model, "block_offload", None) is None  # handed back without hooks


def test_training_memory_estimate_follows_the_options():
    from bindweave_core.config import PRESETS
    from bindweave_core.memory import weight_bytes
    from training.memory_estimate import estimate_training
    from training.model import lora_parameter_count

    config14 = PRESETS["bindweave-14b"]
    cfg = TrainConfig.from_dict({"model": {"smoke": True}, "data": {"path": "x"}, "lora": {"rank": 16}})
    params = lora_parameter_count(config14, cfg.lora.targets, 16)
    # rank 16 on the 12 default linears of 40 blocks: 16 * (in + out) each
    d, f = config14.dim, config14.ffn_dim
    assert params == 40 * 16 * (10 * 2 * d + (d + f) * 2)
    base = estimate_training(cfg, config14, 480, 272, 33, params)
    cfg.train.blocks_to_swap = 10
    swapped = estimate_training(cfg, config14, 480, 272, 33, params)
    block = weight_bytes(config14, torch.bfloat16, "default")[1]
    assert base.weights - swapped.weights == 8 * block  # 10 swapped, a window of 2 on the device
    cfg.train.activation_offload = True
    offloaded = estimate_training(cfg, config14, 480, 272, 33, params)
    assert offloaded.activations < swapped.activations and offloaded.lora == base.lora


def test_held_out_validation_loss(tmp_path, data, cache_dir):
    result = run(config(tmp_path, data, cache_dir, train={"max_steps": 2}, validation={"holdout": 1}))
    assert [step for step, _ in result.val_losses] == [2] and result.val_losses[0][1] > 0
    rows = (tmp_path / "val_loss.csv").read_text().splitlines()
    assert rows[0] == "step,val_loss" and rows[1].startswith("2,")

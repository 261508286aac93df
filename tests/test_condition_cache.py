"""Condition cache: reused tensors are bit-identical to a fresh encode; the models do not run again;
anything that changes the result (VAE, size, frames, tiling, prompt, images) misses; disk entries
survive a new process-level cache and bad files are ignored."""

from __future__ import annotations

import os

import pytest
import torch

from bindweave_core.condition_cache import ConditionCache, model_identity
from bindweave_core.encoders.vae import WanVAE
from bindweave_core.pipeline import BindWeavePipeline, GenerationSettings
from bindweave_core.references import load_image
from helpers import REPO

EXAMPLE = REPO / "examples/singleface_1/man.png"


class Calls:
    """Counts forward calls of a module."""

    def __init__(self, module: torch.nn.Module):
        self.n = 0
        self.handle = module.register_forward_pre_hook(self._count)

    def _count(self, *_):
        self.n += 1

    def close(self):
        self.handle.remove()


def fresh_video_condition(vae: WanVAE, frames: int, height: int, width: int) -> torch.Tensor:
    """The spec-8 video condition computed directly (no cache): 4 zero channels + the zero video's latent."""
    latent = vae.encode(torch.zeros(1, 3, frames, height, width))
    return torch.cat([torch.zeros_like(latent[:, :4]), latent], dim=1)


def test_video_condition_is_exact_and_encoded_once_per_key():
    cache = ConditionCache()
    vae = WanVAE.tiny(0)
    calls = Calls(vae.model.quant_conv)  # once per encode (the encoder runs per chunk)
    try:
        first = vae.video_condition(5, 16, 32, cache=cache)
        assert calls.n == 1
        again = vae.video_condition(5, 16, 32, cache=cache)
        assert calls.n == 1 and torch.equal(first, again)
        assert torch.equal(again, fresh_video_condition(vae, 5, 16, 32))
        calls.n = 0
        vae.video_condition(1, 16, 32, cache=cache)  # other frames
        assert calls.n == 1
        vae.video_condition(5, 32, 16, cache=cache)  # other size
        assert calls.n == 2
        vae.enable_tiling(16, 16)  # tiled encodes give other numbers
        try:
            vae.video_condition(5, 16, 32, cache=cache)
        finally:
            vae.disable_tiling()
        assert calls.n > 2
    finally:
        calls.close()
    other = WanVAE.tiny(1)  # another VAE (same class, other weights) never gets this one's entry
    assert not torch.equal(other.video_condition(5, 16, 32, cache=cache), first)
    assert model_identity(vae)[1] is False  # in-memory models: this process only, never on disk


def test_file_loaded_vae_is_identified_by_its_file_and_cached_on_disk(tmp_path):
    tiny = WanVAE.tiny(0)
    tiny.model.save_pretrained(tmp_path / "vae")
    path = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    vae = WanVAE.load(path, dtype=torch.float32)
    identity, persistent = model_identity(vae)
    assert persistent and identity == model_identity(WanVAE.load(path, dtype=torch.float32))[0]
    cache_dir = tmp_path / "cache"
    first = vae.video_condition(5, 16, 32, cache=ConditionCache(cache_dir))
    files = list(cache_dir.glob("video-*.safetensors"))
    assert len(files) == 1 and not list(cache_dir.glob(".*tmp*"))
    # a new cache over the same folder (a new run): read from disk, the VAE does not run
    reloaded = WanVAE.load(path, dtype=torch.float32)
    calls = Calls(reloaded.model.quant_conv)
    try:
        again = reloaded.video_condition(5, 16, 32, cache=ConditionCache(cache_dir))
    finally:
        calls.close()
    assert calls.n == 0 and torch.equal(first, again)
    assert torch.equal(again, fresh_video_condition(vae, 5, 16, 32))
    # the file changes (mtime): another identity, so the stale entry is not used
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert model_identity(vae)[0] != identity


def test_unreadable_or_foreign_disk_entries_are_ignored(tmp_path):
    cache = ConditionCache(tmp_path)
    parts = {"x": 1}
    value = {"t": torch.arange(6.0).reshape(2, 3)}
    cache.get("text", parts, lambda: value)
    path = cache.path("text", cache.key("text", parts))
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
    computed = []
    out = ConditionCache(tmp_path).get("text", parts, lambda: computed.append(1) or value)
    assert computed == [1] and torch.equal(out["t"], value["t"])
    # a file under the right name but written for another key (e.g. a hash-prefix clash) is not used
    other = ConditionCache(tmp_path)
    other._store("text", other.key("text", {"x": 2}), {"t": torch.zeros(2, 3)})
    os.replace(other.path("text", other.key("text", {"x": 2})), path)
    again = ConditionCache(tmp_path).get("text", parts, lambda: computed.append(2) or value)
    assert computed == [1, 2] and torch.equal(again["t"], value["t"])
    memory = ConditionCache()  # callers get copies: changing one in place does not change the cache
    memory.get("text", parts, lambda: value)["t"].zero_()
    assert torch.equal(memory.get("text", parts, lambda: pytest.fail("recomputed"))["t"], value["t"])


def test_pipeline_reuses_text_planner_and_references_exactly():
    pipe = BindWeavePipeline.smoke(seed=0, condition_cache=ConditionCache())
    settings = GenerationSettings(prompt="a man waves", width=32, height=32, num_frames=1)
    image = load_image(EXAMPLE).resize((56, 84))  # small: the tiny planner still sees real pixels
    modules = {"text_encoder": pipe.component("text_encoder").model, "planner": pipe.component("planner").model.model,
               "clip_vision": pipe.component("clip_vision").model, "vae": pipe.component("vae").model.quant_conv}
    counters = {name: Calls(m) for name, m in modules.items()}
    try:
        text = pipe.encode_text("a man waves", "blurry")
        planner = pipe.encode_planner("a man waves", [image], "blurry")
        refs = pipe.encode_references([image], settings)
        first_counts = {k: c.n for k, c in counters.items()}
        assert all(first_counts.values())
        text2 = pipe.encode_text("a man waves", "blurry")
        planner2 = pipe.encode_planner("a man waves", [image], "blurry")
        refs2 = pipe.encode_references([image], settings)
        assert {k: c.n for k, c in counters.items()} == first_counts  # nothing ran again
        assert torch.equal(text.positive, text2.positive) and torch.equal(text.negative, text2.negative)
        assert torch.equal(planner.positive, planner2.positive) and torch.equal(planner.negative, planner2.negative)
        for a, b in ((refs.clip_tokens, refs2.clip_tokens), (refs.slots, refs2.slots),
                     (refs.video_condition, refs2.video_condition)):
            assert torch.equal(a, b)
        # and equal to a fresh encode with no cache at all
        with torch.no_grad():
            direct = pipe.component("text_encoder").encode(["a man waves", "blurry"])
        assert torch.equal(text2.positive, direct[:1]) and torch.equal(text2.negative, direct[1:])
        assert torch.equal(refs2.slots, pipe.component("vae").reference_slots(refs.canvases, refs.masks))
        # changed inputs miss
        pipe.encode_text("a man runs", "blurry")
        pipe.encode_planner("a man waves", [image.transpose(0)], "blurry")
        pipe.encode_references([image], GenerationSettings(prompt="x", width=32, height=32, num_frames=5))
        assert counters["text_encoder"].n > first_counts["text_encoder"]
        assert counters["planner"].n > first_counts["planner"]
        assert counters["vae"].n > first_counts["vae"]
    finally:
        for c in counters.values():
            c.close()


def test_planner_states_cached_on_disk_per_prompt_images_and_planner(tmp_path):
    """What the planner's own disk cache (``PlannerCache``, removed) did, through the condition cache:
    a repeat runs no forward (also from a new cache over the same folder, as ``--planner-cache DIR`` gives);
    another prompt, negative prompt, image pixel or planner misses."""
    from bindweave_core.encoders.planner import Planner

    planner = Planner.tiny(seed=0)
    pipe = BindWeavePipeline(dit=None, vae=None, text_encoder=None, planner=planner, device="cpu",
                             planner_cache=tmp_path)
    calls = Calls(planner.model.model)
    images = [load_image(EXAMPLE).resize((56, 84))]
    changed = [images[0].copy()]
    changed[0].putpixel((0, 0), (1, 2, 3))
    try:
        first = pipe.encode_planner("A dog runs.", images, "blurry")
        assert calls.n == 2  # positive and negative
        again = BindWeavePipeline(dit=None, vae=None, text_encoder=None, planner=planner, device="cpu",
                                  planner_cache=tmp_path).encode_planner("A dog runs.", images, "blurry")
        assert calls.n == 2
        assert torch.equal(first.positive, again.positive) and torch.equal(first.negative, again.negative)
        direct = planner.encode("A dog runs.", images, negative_prompt="blurry")
        assert torch.equal(first.positive, direct.positive) and torch.equal(first.negative, direct.negative)
        calls.n = 0
        pipe.encode_planner("A cat runs.", images, "blurry")
        pipe.encode_planner("A dog runs.", changed, "blurry")
        pipe.encode_planner("A dog runs.", images, "ugly")
        assert calls.n == 6
    finally:
        calls.close()
    assert len(list(tmp_path.glob("planner-*.safetensors"))) == 4
    assert Planner.tiny(seed=1).identity != planner.identity
    other = BindWeavePipeline(dit=None, vae=None, text_encoder=None, planner=Planner.tiny(seed=1), device="cpu",
                              planner_cache=tmp_path)
    other.encode_planner("A dog runs.", images, "blurry")
    assert len(list(tmp_path.glob("planner-*.safetensors"))) == 5

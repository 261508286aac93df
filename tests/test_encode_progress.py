"""VAE encode progress and cancel between causal chunks (what Reference Encode reports in ComfyUI)."""

from __future__ import annotations

import pytest
import torch

from bindweave_core import constants as C
from bindweave_core.condition_cache import ConditionCache
from bindweave_core.encoders.vae import WanVAE


class Stop(Exception):
    pass


@pytest.fixture(scope="module")
def vae() -> WanVAE:
    return WanVAE.tiny(seed=0)


@pytest.mark.parametrize("frames", [1, 9])
def test_one_call_per_causal_chunk(vae, frames):
    seen = []
    video = torch.zeros(1, 3, frames, 32, 32)
    with vae.chunk_progress(seen.append):
        latents = vae.encode(video)
    # diffusers' Wan VAE encodes the first frame alone, then 4 frames at a time
    assert seen == list(range(1 + (frames - 1) // 4))
    assert latents.shape[2] == len(seen) == C.latent_frames(frames)
    with vae.chunk_progress(seen.append):
        pass
    vae.encode(video)  # the hook is gone after the block
    assert len(seen) == C.latent_frames(frames)


def test_progress_does_not_change_the_latents(vae):
    video = torch.rand(1, 3, 9, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    plain = vae.encode(video)
    with vae.chunk_progress(lambda done: None):
        hooked = vae.encode(video)
    assert torch.equal(plain, hooked)


def test_cancel_between_chunks_stops_the_encode_and_caches_nothing(vae):
    seen = []

    def cancel_at_second(done: int) -> None:
        seen.append(done)
        if done == 1:
            raise Stop

    cache = ConditionCache()
    with pytest.raises(Stop), vae.chunk_progress(cancel_at_second):
        vae.video_condition(13, 32, 32, cache=cache)
    assert seen == [0, 1]  # the chunks after the cancel never ran
    assert len(cache) == 0
    full = vae.video_condition(13, 32, 32, cache=cache)  # and a later run encodes the whole condition
    assert len(cache) == 1
    assert full.shape[2] == C.latent_frames(13)

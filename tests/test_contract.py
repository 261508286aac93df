"""The conditioning states what it was made for; every DiT call checks its latent against it (issue 24.1)."""

from __future__ import annotations

import pytest
import torch

from bindweave_core.conditioning import VideoGeometry
from bindweave_core.contract import ConditionContract
from bindweave_core.denoiser import DiTBranch, dit_velocity
from bindweave_core.errors import InputError
from bindweave_core.pipeline import BindWeavePipeline, GenerationSettings
from helpers import REPO

EXAMPLE = REPO / "examples/singleface_1/man.png"


@pytest.fixture(scope="module")
def pipe():
    return BindWeavePipeline.smoke(seed=0)


def _branches(pipe, family="bindweave", num_frames=9):
    from bindweave_core.references import load_image

    settings = GenerationSettings(prompt="a man", width=64, height=48, num_frames=num_frames)
    text = pipe.encode_text("a man", "bad")
    refs = pipe.encode_references([load_image(EXAMPLE)], settings, family=family)
    planner = pipe.encode_planner("a man", [load_image(EXAMPLE)], "bad") if family == "bindweave" else None
    return pipe.branches(text, planner, refs)


def test_pipeline_references_state_their_video(pipe):
    cond, _ = _branches(pipe)
    assert cond.contract == ConditionContract(family="bindweave", conditioning="slots", in_channels=36, slots=4,
                                              references=1, latent_frames=3, width=64, height=48)
    assert cond.contract.num_frames == 9


def test_a_longer_latent_is_refused_naming_both_sides(pipe):
    """17 frames against a conditioning made for 9: today the DiT would read 2 of the slots as video."""
    cond, _ = _branches(pipe)
    latent = torch.zeros(1, 16, 5, 6, 8)
    with pytest.raises(InputError) as e:
        dit_velocity(pipe.component("dit"), latent, torch.tensor([500.0]), [cond])
    message = str(e.value)
    assert "17 frames (5 latent) at 64x48" in message and "9 frames (3 latent) at 64x48" in message


def test_an_image_latent_and_another_size_are_refused(pipe):
    cond, _ = _branches(pipe)
    with pytest.raises(InputError, match="4-D latent .* not a video"):
        cond.contract.check_latent((1, 4, 6, 8))
    with pytest.raises(InputError, match="9 frames \\(3 latent\\) at 96x48 .* made for 9 frames"):
        dit_velocity(pipe.component("dit"), torch.zeros(1, 16, 3, 6, 12), torch.tensor([500.0]), [cond])


def test_kaleido_references_into_a_bindweave_dit_are_named(pipe):
    kaleido = BindWeavePipeline.smoke(seed=0, family="kaleido")
    cond, _ = _branches(kaleido, family="kaleido")
    with pytest.raises(InputError, match="kaleido references .* bindweave DiT .36 input channels, 16 needed"):
        dit_velocity(pipe.component("dit"), torch.zeros(1, 16, 3, 6, 8), torch.tensor([500.0]), [cond])


def test_the_condition_must_hold_what_the_contract_states(pipe):
    cond, _ = _branches(pipe)
    short = DiTBranch(cond.text_states, cond.planner_states, cond.clip_tokens, cond.condition[:, :, :6],
                      contract=cond.contract)
    with pytest.raises(InputError, match="video condition holds 2 latent frames"):
        dit_velocity(pipe.component("dit"), torch.zeros(1, 16, 3, 6, 8), torch.tensor([500.0]), [short])


def test_a_window_checks_its_latent_against_the_windows_contract(pipe):
    cond, _ = _branches(pipe, num_frames=17)  # 5 latent frames
    window = cond.window(3)
    assert window.contract.latent_frames == 3 and window.contract.slots == 4
    assert window.clip_tokens is cond.clip_tokens and window.planner_states is cond.planner_states
    out = dit_velocity(pipe.component("dit"), torch.zeros(1, 16, 3, 6, 8), torch.tensor([500.0]), [window])
    assert out.shape == (1, 16, 3, 6, 8)
    with pytest.raises(InputError, match="5 frames \\(2 latent\\).*9 frames \\(3 latent\\)"):
        dit_velocity(pipe.component("dit"), torch.zeros(1, 16, 2, 6, 8), torch.tensor([500.0]), [window])


def test_geometry_recorded_by_nodes_is_kept(pipe):
    from bindweave_core.references import load_image

    settings = GenerationSettings(prompt="a man", width=64, height=48, num_frames=9)
    refs = pipe.encode_references([load_image(EXAMPLE)], settings)
    assert refs.geometry == VideoGeometry(64, 48, 9)

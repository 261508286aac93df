"""Context windows in the core sampler (issue 25): placement and weights as ComfyUI's, a single window is
today's output bit for bit, every window's DiT call carries the same reference tensors."""

from __future__ import annotations

import pytest
import torch

from bindweave_core.context_windows import ContextWindow, fuse_weights, plan_windows, windowed_predictor
from bindweave_core.errors import InputError
from bindweave_core.pipeline import BindWeavePipeline, GenerationSettings
from helpers import REPO

EXAMPLE = REPO / "examples/singleface_1/man.png"


def test_static_windows_of_the_acceptance_run():
    """161 frames (41 latent), windows of 33 frames (9 latent) overlapping 8 (2 latent): starts every 7
    frames, the last moved back to end at frame 40; every window but the first has the frame before it."""
    windows = plan_windows(41, 33, 8, "standard_static")
    assert [(w.frames[0], w.frames[-1], w.anchor) for w in windows] == [
        (0, 8, None), (7, 15, 6), (14, 22, 13), (21, 29, 20), (28, 36, 27), (32, 40, 31)]
    assert all(len(w.frames) == 9 for w in windows)
    assert windows[1].dit_frames == [6, 7, 8, 9, 10, 11, 12, 13, 14, 15]
    assert windows[-1].describe() == {"latent_frames": [32, 40], "video_frames": [125, 160],
                                      "anchor_latent_frame": 31}


def test_batched_windows_and_windows_that_do_not_divide_the_length():
    assert [(w.frames[0], w.frames[-1]) for w in plan_windows(10, 13, 0, "batched")] == [(0, 3), (4, 7), (8, 9)]
    # 4k+1 lengths that are not a multiple of the stride: every frame covered, the last window full length
    for frames in (6, 11, 12, 20):
        windows = plan_windows(frames, 17, 4)
        assert sorted({f for w in windows for f in w.frames}) == list(range(frames))
        assert len(windows[-1].frames) == 5 and windows[-1].frames[-1] == frames - 1


def test_off_and_short_videos_are_one_window_without_anchor():
    assert plan_windows(21, 0, 16) == [ContextWindow(tuple(range(21)))]
    assert plan_windows(9, 33, 8) == [ContextWindow(tuple(range(9)))]


def test_fuse_weights():
    w = ContextWindow(tuple(range(5, 14)), anchor=4)
    assert fuse_weights(w, 41, 2, "pyramid").tolist() == [1, 2, 3, 4, 5, 4, 3, 2, 1]
    assert fuse_weights(ContextWindow((0, 1, 2, 3)), 8, 2, "pyramid").tolist() == [1, 2, 2, 1]
    assert fuse_weights(w, 41, 2, "flat").tolist() == [1.0] * 9
    ramp = fuse_weights(w, 41, 3, "overlap-linear")
    assert ramp[:3].tolist() == pytest.approx([1e-37, 0.5, 1.0]) and ramp[3:6].tolist() == [1, 1, 1]
    assert ramp[6:].tolist() == pytest.approx([1.0, 0.5, 1e-37])
    first = fuse_weights(ContextWindow(tuple(range(9))), 41, 3, "overlap-linear")
    assert first[:6].tolist() == [1.0] * 6  # no neighbour on the left: no ramp


def test_windowed_prediction_drops_the_anchor_and_averages_with_the_weights():
    """A predictor returning the window's own latents gives back the input exactly (each frame in its place);
    one returning the window number gives the weighted mean by hand at an overlapped frame."""
    windows = plan_windows(11, 17, 4)  # L=5, O=1: [0-4], [4-8] anchor 3, [6-10] anchor 5
    assert [(w.frames[0], w.anchor) for w in windows] == [(0, None), (4, 3), (6, 5)]
    latents = torch.randn(1, 16, 11, 2, 3)
    seen = []

    def identity_for(frames):
        seen.append(frames)
        return lambda x, t, which: x

    out = windowed_predictor(windows, identity_for, 11, 1, "pyramid")(latents, torch.tensor([1.0]), "cond")
    assert seen == [5, 6, 6] and torch.allclose(out, latents, rtol=0, atol=1e-6)

    calls = iter(range(3))

    def numbered_for(frames):
        k = next(calls)
        return lambda x, t, which: torch.full_like(x, k)

    number = windowed_predictor(windows, numbered_for, 11, 1, "pyramid")(latents, torch.tensor([1.0]), "cond")
    # frame 4: window 0 (position 4, weight 1) and window 1 (position 0, weight 1) -> (0 + 1) / 2
    # frame 6: window 1 (position 2, weight 3) and window 2 (position 0, weight 1) -> (3*1 + 1*2) / 4
    assert number[0, 0, 4, 0, 0].item() == 0.5 and number[0, 0, 6, 0, 0].item() == 1.25


@pytest.mark.parametrize("kw, message", [
    (dict(context_frames=30), "context frames must be 0 \\(off\\) or 4k\\+1"),
    (dict(context_frames=33, context_overlap=6), "context overlap must be a multiple of 4 .*e.g. 4 or 8"),
    (dict(context_frames=33, context_overlap=32), "must be shorter than the window"),
    (dict(context_frames=33, context_schedule="looped_uniform"), "unknown context schedule"),
    (dict(context_frames=33, context_fuse="relative"), "unknown context fuse method"),
])
def test_bad_window_settings(kw, message):
    with pytest.raises(InputError, match=message):
        GenerationSettings(prompt="a man", **kw).validate(1)


# ------------------------------------------------------------------------------------------ with the smoke models
@pytest.fixture(scope="module")
def pipe():
    return BindWeavePipeline.smoke(seed=0)


SMALL = dict(prompt="a man waves", width=64, height=48, steps=1, seed=5)


def test_a_single_window_is_todays_output_bit_for_bit(pipe):
    today = pipe.generate([EXAMPLE], GenerationSettings(**SMALL | {"steps": 2}, num_frames=9))
    one_window = pipe.generate([EXAMPLE], GenerationSettings(**SMALL | {"steps": 2}, num_frames=9, context_frames=9,
                                                             context_overlap=4))
    assert torch.equal(today.latents, one_window.latents) and torch.equal(today.frames, one_window.frames)
    assert one_window.windows is None


class DiTInputs:
    """Records what each DiT call was given (a forward pre-hook with keyword arguments)."""

    def __init__(self, dit):
        self.calls: list[dict] = []
        self.handle = dit.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs):
        self.calls.append({"frames": args[0].shape[2], "text": args[2].clone(), "clip": args[3].clone(),
                           **{k: kwargs[k].clone() for k in ("planner_states", "condition")}})

    def close(self):
        self.handle.remove()


def test_every_window_gets_the_same_references_and_a_window_length_video_condition(pipe):
    """21 frames (6 latent) in windows of 13 (4 latent) overlapping 4: windows [0-3] and [2-5] (anchor 1), so
    the DiT sees clips of 4 and 5 latent frames. Every call carries the same text, planner, CLIP tokens and
    reference slots; its video condition is that of a clip of its length (the VAE's own, computed apart)."""
    settings = GenerationSettings(**SMALL, num_frames=21, context_frames=13, context_overlap=4)
    inputs = DiTInputs(pipe.component("dit"))
    try:
        result = pipe.generate([EXAMPLE], settings)
    finally:
        inputs.close()
    assert result.windows == [{"latent_frames": [0, 3], "video_frames": [0, 12], "anchor_latent_frame": None},
                              {"latent_frames": [2, 5], "video_frames": [5, 20], "anchor_latent_frame": 1}]
    assert [c["frames"] for c in inputs.calls] == [4, 5] * settings.steps
    first = inputs.calls[0]
    vae = pipe.component("vae")
    for call in inputs.calls:
        for key in ("text", "clip", "planner_states"):
            assert torch.equal(call[key], first[key]), key
        assert torch.equal(call["condition"][:, :, :4], first["condition"][:, :, :4])  # the reference slots
        clip = vae.video_condition(4 * (call["frames"] - 1) + 1, 48, 64)  # [1, 20, n, h, w]
        for item in call["condition"]:  # the positive and negative branch, batched
            assert torch.equal(item[None, :, 4:], clip.to(item))
    assert result.latents.shape == (1, 16, 6, 6, 8) and result.latents.isfinite().all()


def test_kaleido_windows_keep_the_reference_latents_whole():
    kaleido = BindWeavePipeline.smoke(seed=0, family="kaleido")
    dit = kaleido.component("dit")
    seen = []
    handle = dit.register_forward_pre_hook(lambda m, a, kw: seen.append((a[0].shape[2], kw["reference_latents"].clone())),
                                           with_kwargs=True)
    try:
        kaleido.generate([EXAMPLE], GenerationSettings(**SMALL, num_frames=21, context_frames=13, context_overlap=4,
                                                       guidance=1.0))
    finally:
        handle.remove()
    assert [s[0] for s in seen] == [4, 5]
    assert all(torch.equal(s[1], seen[0][1]) and s[1].shape[1] == 1 for s in seen)


def test_windows_report_progress_and_cancel_between_windows(pipe):
    from bindweave_core.errors import GenerationCancelled

    seen = []

    def stop_in_the_second_window(index, total):
        seen.append((index, total))
        if len(seen) == 2:
            raise GenerationCancelled(f"cancelled in window {index + 1} of {total}")

    settings = GenerationSettings(**SMALL, num_frames=21, context_frames=13, context_overlap=4)
    with pytest.raises(GenerationCancelled, match="window 2 of 2"):
        pipe.generate([EXAMPLE], settings, window_callback=stop_in_the_second_window)
    assert seen == [(0, 2), (1, 2)]


def test_chunked_decode_equals_the_whole_decode(pipe):
    latents = torch.randn(1, 16, 3, 2, 2, generator=torch.Generator().manual_seed(3))
    chunks = []
    written = pipe.decode_to(latents, chunks.append)
    assert written == 9 and [c.shape[0] for c in chunks] == [1, 4, 4]
    assert torch.equal(torch.cat(chunks), pipe.decode(latents))


def test_the_memory_estimate_counts_the_longest_window_not_the_video():
    """161 frames in windows of 33 overlapping 8: the DiT sees at most 9 + 1 (anchor) latent frames, i.e. a
    37-frame clip; the video condition is computed for that length once."""
    from types import SimpleNamespace

    from bindweave_core.runtime import RuntimeOptions, run_shape

    settings = GenerationSettings(prompt="a man", width=416, height=240, num_frames=161, context_frames=33,
                                  context_overlap=8)
    assert settings.condition_frames == 37
    shape = run_shape(SimpleNamespace(runtime=RuntimeOptions()), settings, torch.bfloat16, "default", 2)
    assert shape.num_frames == 37
    assert GenerationSettings(prompt="a man", num_frames=161).condition_frames == 161


def test_generate_command_with_windows_writes_every_frame_and_lists_the_windows(tmp_path):
    import json

    from bindweave_core import cli
    from bindweave_core.video_io import read_video

    out = tmp_path / "long.mp4"
    assert cli.main(["generate", "--smoke", "--ref", str(EXAMPLE), "--prompt", "a man walks", "--width", "64",
                     "--height", "48", "--frames", "21", "--context-frames", "13", "--context-overlap", "4",
                     "--steps", "1", "--out", str(out)]) == 0
    frames, _ = read_video(out)
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert frames.shape[0] == 21 and sidecar["frames_written"] == 21
    assert [w["latent_frames"] for w in sidecar["context_windows"]] == [[0, 3], [2, 5]]
    assert sidecar["settings"]["context_frames"] == 13 and sidecar["settings"]["context_fuse"] == "pyramid"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["long.json", "long.mp4"]

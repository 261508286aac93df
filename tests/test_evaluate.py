"""The evaluation (bindweave_core.evaluate): formulas against values computed here by hand, synthetic videos
with known answers, the command line and ``generate --evaluate`` on the smoke models."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from bindweave_core.cli import main
from bindweave_core.encoders.clip_vision import ClipVisionEncoder
from bindweave_core.errors import InputError
from bindweave_core.evaluate import flow, temporal
from bindweave_core.evaluate.plot import draw_plot
from bindweave_core.evaluate.report import EvaluationOptions, evaluate_video, sample_indices
from bindweave_core.evaluate.windows import parse_windows
from bindweave_core.video_io import write_mp4
from helpers import REPO

EXAMPLE = REPO / "examples/singleface_1/man.png"


@pytest.fixture(scope="module")
def clip():
    return ClipVisionEncoder.tiny(0)


def smooth_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth random RGB picture (uint8): low-frequency noise upsampled."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(1, 3, 6, 6, generator=g)
    big = F.interpolate(small, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)
    return (big[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()


def pattern(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A texture with gradients in both directions (no aperture problem), period 16 px."""
    return 0.5 + 0.2 * np.sin(2 * np.pi * x / 16) + 0.2 * np.sin(2 * np.pi * y / 16)


def grey_video(planes: list[np.ndarray]) -> np.ndarray:
    return np.stack([np.repeat((p * 255).round().astype(np.uint8)[..., None], 3, -1) for p in planes])


# ------------------------------------------------------------------------------------------ formulas
def test_subject_consistency_is_vbenchs_formula_by_hand():
    f = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 3.0], [-2.0, 0.0]])
    c45 = math.cos(math.pi / 4)
    # frame 1: prev 45 deg, first 45 deg; frame 2: prev 45 deg, first 90 deg; frame 3: prev 90, first 180 -> 0
    expected = [(c45 + c45) / 2, (c45 + 0.0) / 2, (0.0 + 0.0) / 2]
    assert temporal.consistency_scores(f).tolist() == pytest.approx(expected, abs=1e-6)


def test_temporal_flickering_is_vbenchs_formula_by_hand():
    frames = np.zeros((3, 4, 5, 3), np.uint8)
    frames[1] = 40
    frames[2, :, :2] = 40  # 2 of 5 columns stay at 40, the rest drop back to 0
    mae = temporal.frame_pair_mae(frames)
    assert mae.tolist() == pytest.approx([40.0, 40.0 * 3 / 5])
    assert temporal.flickering_score(mae) == pytest.approx((255 - (40 + 24) / 2) / 255)


def test_sampling_is_even_from_first_to_last():
    assert sample_indices(81, 5) == [0, 20, 40, 60, 80]
    assert sample_indices(10, 32) == list(range(10)) == sample_indices(10, 0)


# ------------------------------------------------------------------------------------------ synthetic videos
def test_static_video_scores_one(clip):
    video = np.repeat(smooth_image(48, 64)[None], 9, 0)
    report = evaluate_video(video, [smooth_image(40, 30, seed=1)], clip)
    m = report["metrics"]
    assert m["temporal_flickering"]["overall"] == 1.0
    assert m["subject_consistency"]["overall"] == pytest.approx(1.0, abs=1e-6)
    # 0 up to the float rounding of our bilinear warp; OpenCV's Farneback (the default where it is installed)
    # leaves a few thousandths of a pixel on a still, smooth image
    assert m["motion_amplitude"]["overall"] < (1e-2 if "Farneback" in m["motion_amplitude"]["method"] else 1e-4)
    torch_motion, _ = flow.motion_per_pair(video, method="torch-lucas-kanade")
    assert torch_motion.max() < 1e-4


def test_video_of_the_reference_is_similar_to_it(clip):
    ref = smooth_image(300, 200, seed=2)
    # The metric squashes each frame to 224 x 224 (bilinear, antialiased, half-pixel centres): make the video
    # that way, so the frames are the reference as the metric sees it (up to uint8 rounding).
    x = torch.from_numpy(ref).permute(2, 0, 1)[None].float() / 255
    frame = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    frame = (frame[0].permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    report = evaluate_video(np.repeat(frame[None], 5, 0), [ref, smooth_image(300, 200, seed=3)], clip)
    first, other = report["metrics"]["clip_i"]["per_reference"]
    assert min(first["values"]) >= 0.999
    assert other["mean"] < first["mean"]


def test_shuffled_frames_lower_consistency(clip):
    # A picture slid across the frame: neighbouring frames alike, distant ones not.
    wide = smooth_image(64, 64 * 5, seed=4)
    video = np.stack([wide[:, 12 * t:12 * t + 64] for t in range(13)])
    shuffled = video[np.random.default_rng(0).permutation(13)]
    ordered = evaluate_video(video, [wide[:, :64]], clip, EvaluationOptions(samples=0))
    mixed = evaluate_video(shuffled, [wide[:, :64]], clip, EvaluationOptions(samples=0))
    assert (mixed["metrics"]["subject_consistency"]["overall"]
            < ordered["metrics"]["subject_consistency"]["overall"] - 0.005)
    assert mixed["metrics"]["temporal_flickering"]["overall"] < ordered["metrics"]["temporal_flickering"]["overall"]


def test_moving_square_gives_the_motion_computed_here():
    size, side, step = 128, 32, 2
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    planes = []
    for t in range(6):
        plane = np.full((size, size), 0.5)
        x0, y0 = 30 + step * t, 48
        plane[y0:y0 + side, x0:x0 + side] = pattern(xx[:side, :side], yy[:side, :side])  # the texture moves along
        planes.append(plane)
    motion, _ = flow.motion_per_pair(grey_video(planes), method="torch-lucas-kanade")
    # The square's pixels move `step` px per frame, the background none: the frame mean lies between the
    # square's share and the share of the square grown by the flow window's reach plus the step.
    reach = flow.LK_WINDOW // 2 + step
    low, high = step * side ** 2 / size ** 2, step * (side + 2 * reach) ** 2 / size ** 2
    assert all(low <= m <= high for m in motion), (motion, low, high)
    gray, _ = flow.luma(grey_video(planes[:2]))
    field = flow.lucas_kanade(gray[:1], gray[1:])[0, :, 48 + 4:48 + side - 4, 32 + 4:32 + side - 4]
    assert field[0].median().item() == pytest.approx(step, rel=0.05)  # inside: (step, 0)
    assert field[1].abs().median().item() < 0.1


def test_panning_texture_moves_by_its_shift():
    size, step = 128, 2
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    video = grey_video([pattern(xx - step * t, yy) for t in range(5)])  # periodic in 128: a true translation
    motion, _ = flow.motion_per_pair(video, method="torch-lucas-kanade")
    assert motion.tolist() == pytest.approx([step] * 4, rel=0.12)


def test_motion_is_in_the_videos_pixels_after_downscaling():
    size, step = 512, 8  # analysed at 160 px: 2.5 px there, 8 px in the video
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    video = grey_video([0.5 + 0.2 * np.sin(2 * np.pi * (xx - step * t) / 64) + 0.2 * np.sin(2 * np.pi * yy / 64)
                        for t in range(3)])
    motion, _ = flow.motion_per_pair(video, method="torch-lucas-kanade")
    assert motion.tolist() == pytest.approx([step] * 2, rel=0.12)


# ------------------------------------------------------------------------------------------ options
def test_windows_means_are_the_means_of_the_frames_inside(clip):
    video = np.stack([smooth_image(32, 32, seed=t) for t in range(8)])
    report = evaluate_video(video, [smooth_image(32, 32, seed=9)], clip, EvaluationOptions(windows="0:5, 3:8"))
    curve = report["metrics"]["clip_i"]["per_reference"][0]
    flicker = report["metrics"]["temporal_flickering"]
    for w, (start, end) in zip(report["windows"], [(0, 5), (3, 8)]):
        assert (w["start"], w["end"]) == (start, end)
        assert w["means"]["clip_i[0]"] == pytest.approx(np.mean(curve["values"][start:end]))
        inside = [v for f, v in zip(flicker["frames"], flicker["values"]) if start <= f < end]
        assert w["means"]["temporal_flickering"] == pytest.approx(np.mean(inside))
    assert evaluate_video(video, [video[0]], clip)["windows"] == []


@pytest.mark.parametrize("value, message", [("0:9", "not inside"), ("3:2", "not inside"), ("a:b", "start:end"),
                                            ([[0, 2, 4]], "[start, end)")])
def test_bad_windows_are_refused(value, message):
    with pytest.raises(InputError, match=message.replace("[", r"\[").replace(")", r"\)")):
        parse_windows(value, 8)


def test_sidecar_windows_take_pairs_or_objects():
    assert parse_windows([[0, 4], {"start": 2, "end": 8}], 8) == [(0, 4), (2, 8)]


def test_missing_optional_models_give_one_line_each_and_the_rest_is_computed(clip, tmp_path):
    faces_dir = tmp_path / "buffalo_l"
    faces_dir.mkdir()
    (faces_dir / "w600k_r50.onnx").write_bytes(b"not read: the package is missing")
    video = np.stack([smooth_image(32, 32, seed=t) for t in range(4)])
    report = evaluate_video(video, [video[0]], clip, EvaluationOptions(face_models=str(faces_dir)))
    skipped = report["skipped"]
    assert len(skipped) == 2 and all("\n" not in line for line in skipped)
    assert any(line.startswith("DINO-I not computed") for line in skipped)
    assert any("insightface" in line and "non-commercial" in line for line in skipped)
    assert {"clip_i", "subject_consistency", "temporal_flickering", "motion_amplitude"} <= set(report["metrics"])
    assert "CLIP" in report["metrics"]["subject_consistency"]["features"]


@pytest.mark.parametrize("option, message", [("dino", "config.json"), ("face_models", "no .onnx")])
def test_wrong_model_folders_are_refused_before_work(clip, tmp_path, option, message):
    video = np.zeros((3, 16, 16, 3), np.uint8)
    with pytest.raises(InputError, match=message):
        evaluate_video(video, [video[0]], clip, EvaluationOptions(**{option: str(tmp_path)}))


def test_dinov2_gives_dino_i_and_vbench_consistency(clip, tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             image_size=224, patch_size=14)).save_pretrained(tmp_path / "dino")
    video = np.repeat(smooth_image(40, 40)[None], 4, 0)
    report = evaluate_video(video, [video[0]], clip, EvaluationOptions(dino=str(tmp_path / "dino")))
    m = report["metrics"]
    assert m["dino_i"]["overall"] == pytest.approx(1.0, abs=1e-5)  # the frames are the reference
    assert "DINOv2" in m["subject_consistency"]["features"] and m["subject_consistency"]["overall"] == pytest.approx(1.0)
    assert not any(line.startswith("DINO-I") for line in report["skipped"])


def test_regions_find_the_reference_in_a_corner(clip):
    ref = smooth_image(64, 64, seed=5)
    frame = np.full((128, 128, 3), 128, np.uint8)
    frame[64:, 64:] = ref  # the bottom-right half-size region is exactly the reference
    report = evaluate_video(np.repeat(frame[None], 3, 0), [ref], clip, EvaluationOptions(regions=True))
    region = report["metrics"]["clip_i_region"]["per_reference"][0]
    assert region["boxes"][0] == [64, 64, 128, 128]
    assert min(region["values"]) >= 0.999 > report["metrics"]["clip_i"]["overall"]


def test_plot_draws_every_curve(clip):
    video = np.stack([smooth_image(32, 48, seed=t) for t in range(6)])
    report = evaluate_video(video, [video[0], video[5]], clip, EvaluationOptions(windows="0:4,2:6"))
    image = draw_plot(report)
    assert image.size == (1100, 640) and image.mode == "RGB"
    assert len(image.getcolors(1 << 16)) > 20  # curves, text and shading, not a blank canvas


# ------------------------------------------------------------------------------------------ command line
def test_cli_writes_json_and_plot_with_sidecar_windows(tmp_path, capsys):
    frames = np.stack([smooth_image(48, 80, seed=t % 3) for t in range(9)])
    video = write_mp4(frames, tmp_path / "clip.mp4", fps=8)
    (tmp_path / "clip.json").write_text(json.dumps({"windows": [[0, 5], [4, 9]]}))
    out_json, out_png = tmp_path / "out" / "eval.json", tmp_path / "out" / "eval.png"
    code = main(["evaluate", str(video), "--ref", str(EXAMPLE), "--prompt", "a man", "--json", str(out_json),
                 "--plot", str(out_png), "--smoke", "--samples", "4"])
    assert code == 0
    report = json.loads(out_json.read_text())
    assert report["prompt"]["text"] == "a man" and report["video"]["frames"] == 9 and report["video"]["fps"] == 8
    assert report["sampling"]["frames"] == [0, 3, 5, 8]
    assert [(w["start"], w["end"]) for w in report["windows"]] == [(0, 5), (4, 9)]
    assert report["windows_source"].endswith("clip.json") and "not OpenS2V-Eval" in report["not_opens2v"]
    assert Image.open(out_png).size == (1100, 640)
    assert "clip_i" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [([], "--clip-vision"), (["--smoke", "--plot", "x.jpg"], "must end in .png"),
                                            (["--smoke", "--windows", "0:99"], "not inside")])
def test_cli_refuses_bad_input_before_loading(tmp_path, capsys, extra, message):
    frames = np.zeros((3, 16, 16, 3), np.uint8)
    video = write_mp4(frames, tmp_path / "v.mp4")
    args = ["evaluate", str(video), "--ref", str(EXAMPLE), "--json", str(tmp_path / "o.json"), *extra]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.json").exists()


def test_generate_evaluate_scores_into_the_sidecar(tmp_path):
    from bindweave_core.generate_cli import generate_to_file
    from bindweave_core.pipeline import BindWeavePipeline, GenerationSettings

    pipe = BindWeavePipeline.smoke(seed=0)
    settings = GenerationSettings(prompt="a man waves", width=64, height=48, num_frames=5, steps=1)
    out = tmp_path / "v.mp4"
    generate_to_file(pipe, [EXAMPLE], settings, out, evaluate=True, smoke=True,
                     sidecar={"windows": [[0, 3], [2, 5]]})
    evaluation = json.loads(out.with_suffix(".json").read_text())["evaluation"]
    assert evaluation["video"]["frames"] == 5 and evaluation["prompt"]["text"] == "a man waves"
    assert evaluation["references"][0]["name"].endswith("man.png")
    assert len(evaluation["metrics"]["clip_i"]["per_reference"][0]["values"]) == 5
    assert [(w["start"], w["end"]) for w in evaluation["windows"]] == [(0, 3), (2, 5)]


def test_farneback_when_opencv_is_installed_gives_the_pan():
    try:
        import cv2  # noqa: F401
    except ImportError:
        pytest.skip("needs an optional extra: opencv-python-headless (pip install -e .[evaluate])")
    size, step = 128, 2
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    video = grey_video([pattern(xx - step * t, yy) for t in range(4)])
    motion, method = flow.motion_per_pair(video, method="farneback")
    assert method == "farneback" and motion.tolist() == pytest.approx([step] * 3, rel=0.15)


def test_farneback_without_opencv_is_one_clear_error(clip, monkeypatch):
    monkeypatch.setattr(flow, "default_method", lambda: "torch-lucas-kanade")  # as on a machine without cv2
    video = np.zeros((3, 16, 16, 3), np.uint8)
    with pytest.raises(InputError, match="pip install opencv-python-headless"):
        evaluate_video(video, [video[0]], clip, EvaluationOptions(flow_method="farneback"))


def test_generate_evaluate_on_the_command_line_kaleido_smoke(tmp_path):
    # The Kaleido smoke model has no CLIP: the smoke run scores with the tiny CLIP.
    out = tmp_path / "k.mp4"
    code = main(["generate", "--smoke", "--family", "kaleido", "--ref", str(EXAMPLE), "--prompt", "a man",
                 "--width", "64", "--height", "48", "--frames", "5", "--steps", "1", "--evaluate", "--out", str(out)])
    assert code == 0
    evaluation = json.loads(out.with_suffix(".json").read_text())["evaluation"]
    assert evaluation["schema"] == "bindweave-evaluation/1" and evaluation["video"]["frames"] == 5


def test_generate_evaluate_needs_a_clip_file_when_the_family_has_none():
    from bindweave_core.evaluate.generated import check_can_evaluate

    with pytest.raises(InputError, match="--clip-vision"):
        check_can_evaluate(("vae", "text_encoder"), None, smoke=False)
    check_can_evaluate(("vae", "text_encoder", "clip_vision"), None, smoke=False)  # BindWeave brings its own

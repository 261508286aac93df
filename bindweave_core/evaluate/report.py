"""``evaluate_video``: score a video against its reference images; the JSON-ready report (docs/evaluation.md).

Similarity metrics run on ``samples`` frames evenly spaced over the video (default 32, as OpenS2V-Eval
samples); temporal flickering runs over every consecutive pair of frames, motion amplitude over the pair
ending at each sampled frame.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import InputError
from ..video_io import frames_to_uint8
from . import faces, features, flow, temporal
from .windows import parse_windows, window_means

log = logging.getLogger("BindWeave")

SCHEMA = "bindweave-evaluation/1"
DEFAULT_SAMPLES = 32
NOT_OPENS2V = (
    "These are not OpenS2V-Eval scores. OpenS2V-Eval's NexusScore, NaturalScore and GmeScore need YOLO-World, "
    "GME-Qwen2-VL-7B and GPT-4o, and its Aesthetics/Motion/FaceSim numbers come from its own models and "
    "normalisation; these metrics use local models (the user's CLIP ViT-H, optionally DINOv2 and ArcFace) and "
    "are comparable only with other runs of this evaluation (same models, same settings).")
CONSISTENCY_FORMULA = ("VBench subject consistency: mean over sampled frames i >= 1 of (max(0, cos(f_{i-1}, f_i)) "
                       "+ max(0, cos(f_0, f_i))) / 2, f = L2-normalised image features")
FLICKER_FORMULA = ("VBench temporal flickering: (255 - mean over consecutive frame pairs of the mean absolute "
                   "difference of their uint8 RGB pixels) / 255, over all frames")
MOTION_FORMULA = ("mean over pixels of |optical flow from frame i-1 to frame i|, in the video's pixels per frame, "
                  "for each sampled frame i >= 1; overall = mean over those pairs")


@dataclass
class EvaluationOptions:
    """What to compute. ``dino``: a DINOv2 transformers folder (DINO-I, and subject consistency on DINOv2
    as VBench does); ``face_models``: an InsightFace model pack folder; ``windows``: context windows
    (``[start, end)`` pairs or ``"s:e, s:e"``); ``samples``: frames sampled for the similarity metrics (0 =
    all); ``regions``: also search the best-matching half-size region (10 CLIP passes per frame)."""

    samples: int = DEFAULT_SAMPLES
    regions: bool = False
    dino: str | None = None
    face_models: str | None = None
    flow_method: str | None = None
    windows: Any = None
    prompt: str | None = None


def sample_indices(num_frames: int, samples: int) -> list[int]:
    """``samples`` frame indices evenly spaced from the first to the last frame (all frames if 0 or more
    than the video has)."""
    if samples <= 0 or samples >= num_frames:
        return list(range(num_frames))
    return sorted({int(round(v)) for v in np.linspace(0, num_frames - 1, samples)})


def check_inputs(video: np.ndarray, n_refs: int, options: EvaluationOptions) -> tuple[list, list[str]]:
    """Everything checkable before a model runs: ``(windows, skipped lines)``."""
    if video.ndim != 4 or video.shape[-1] != 3:
        raise InputError(f"video frames must be [frames, height, width, 3], got shape {list(video.shape)}")
    if video.shape[0] < 2:
        raise InputError(f"the video has {video.shape[0]} frame; the temporal metrics need at least 2")
    if n_refs < 1:
        raise InputError("give at least one reference image to compare the video with")
    if options.samples < 0:
        raise InputError(f"samples must be 0 (all frames) or more, got {options.samples}")
    if options.flow_method is not None and options.flow_method not in flow.METHODS:
        raise InputError(f"flow method {options.flow_method!r}: choose one of {sorted(flow.METHODS)}")
    if options.flow_method == "farneback" and flow.default_method() != "farneback":
        raise InputError("flow method farneback needs OpenCV: pip install opencv-python-headless")
    skipped = []
    if options.dino:
        features.check_dino_dir(options.dino)
    else:
        skipped.append("DINO-I not computed: no DINOv2 checkpoint given (subject consistency uses CLIP features)")
    if options.face_models:
        faces.check_face_dir(options.face_models)
        if (reason := faces.missing_package()) is not None:
            skipped.append(reason)
    else:
        skipped.append("face similarity not computed: no InsightFace model folder given")
    return parse_windows(options.windows, int(video.shape[0])), skipped


def _similarity(name: str, model: str, formula: str, preprocessing: str, refs: torch.Tensor,
                frames: torch.Tensor, idx: list[int]) -> dict[str, Any]:
    """A per-reference similarity metric from reference features ``[R, D]`` and frame features ``[F, D]``."""
    sims = features.cosine(refs[:, None], frames[None])
    per_ref = [{"reference": r, "mean": float(s.mean()), "min": float(s.min()), "frames": idx,
                "values": [float(v) for v in s]} for r, s in enumerate(sims)]
    return {"name": name, "model": model, "formula": formula, "preprocessing": preprocessing,
            "overall": float(sims.mean()), "per_reference": per_ref}


def _clip_metrics(encoder: Any, sampled: torch.Tensor, refs: list[torch.Tensor], idx: list[int],
                  regions: bool) -> tuple[dict[str, Any], torch.Tensor]:
    frame_feats = features.clip_features(encoder, sampled)
    ref_feats = torch.cat([features.clip_features(encoder, r) for r in refs])
    model = f"CLIP vision tower ({getattr(encoder, 'source', '') or 'given'})"
    out = {"clip_i": _similarity("CLIP-I subject similarity", model, "cos(CLIP(reference), CLIP(frame))",
                                 features.CLIP_PREPROCESSING, ref_feats, frame_feats, idx)}
    if regions:
        crop_feats, boxes = features.region_features(encoder, sampled)
        sims = features.cosine(ref_feats[:, None, None], crop_feats[None])  # [R, F, regions]
        best, where = sims.max(-1)
        per_ref = [{"reference": r, "mean": float(b.mean()), "min": float(b.min()), "frames": idx,
                    "values": [float(v) for v in b], "boxes": [list(boxes[int(i)]) for i in w]}
                   for r, (b, w) in enumerate(zip(best, where))]
        out["clip_i_region"] = {
            "name": "CLIP-I best-matching region", "model": model, "preprocessing": features.CLIP_PREPROCESSING,
            "formula": "max over regions of cos(CLIP(reference), CLIP(region)); regions: the whole frame and "
                       "half-width x half-height crops at offsets 0, 1/4, 1/2 of the frame (3 x 3); boxes are "
                       "[x0, y0, x1, y1] pixels", "overall": float(best.mean()), "per_reference": per_ref}
    return out, frame_feats


def _temporal_metrics(video: np.ndarray, feats: torch.Tensor, feature_name: str, idx: list[int],
                      flow_method: str | None) -> dict[str, Any]:
    n = int(video.shape[0])
    scores = temporal.consistency_scores(feats) if len(idx) > 1 else torch.zeros(0)
    mae = temporal.frame_pair_mae(video)
    motion_frames = [i for i in idx if i > 0]  # flow from frame i - 1 to sampled frame i
    motion, method = flow.motion_per_pair(video, motion_frames, flow_method)
    pairs = list(range(1, n))  # pair (i - 1, i) is plotted at frame i
    return {
        "subject_consistency": {"features": feature_name, "formula": CONSISTENCY_FORMULA,
                                "overall": float(scores.mean()) if len(scores) else None,
                                "frames": idx[1:], "values": [float(v) for v in scores]},
        "temporal_flickering": {"formula": FLICKER_FORMULA, "overall": temporal.flickering_score(mae),
                                "frames": pairs, "values": [(255.0 - float(v)) / 255.0 for v in mae]},
        "motion_amplitude": {"method": flow.METHODS[method], "formula": MOTION_FORMULA,
                             "analysis_max_side": flow.FLOW_MAX_SIDE, "units": "pixels per frame",
                             "overall": float(np.mean(motion)), "frames": motion_frames,
                             "values": [float(v) for v in motion]},
    }


def _face_metric(folder: str, sampled: np.ndarray, refs: list[torch.Tensor], idx: list[int]) -> dict[str, Any]:
    scorer = faces.FaceScorer(folder)
    per_ref = faces.face_scores(scorer, sampled, [r[0].numpy() for r in refs])
    for r, entry in enumerate(per_ref):
        entry.update(reference=r, frames=idx)
    means = [e["mean"] for e in per_ref if e["mean"] is not None]
    return {"name": "face similarity", "model": f"InsightFace ArcFace ({scorer.source})", "licence": faces.LICENCE,
            "formula": "per frame: max over detected faces of cos(ArcFace(largest reference face), ArcFace(face))",
            "overall": float(np.mean(means)) if means else None, "per_reference": per_ref}


def curves(metrics: dict[str, Any]) -> dict[str, dict[str, list]]:
    """Every per-frame curve of a report's metrics, by name (``clip_i[0]``: reference 0's CLIP-I)."""
    out = {}
    for key, metric in metrics.items():
        if "per_reference" in metric:
            for entry in metric["per_reference"]:
                out[f"{key}[{entry['reference']}]"] = {"frames": entry["frames"], "values": entry["values"]}
        elif "values" in metric:
            out[key] = {"frames": metric["frames"], "values": metric["values"]}
    return out


def evaluate_video(frames: np.ndarray | torch.Tensor, references: list, clip_vision: Any,
                   options: EvaluationOptions | None = None, *, fps: float | None = None,
                   source: str | None = None, reference_names: list[str] | None = None) -> dict[str, Any]:
    """Score ``frames`` (``[N, H, W, 3]`` uint8, or float in 0..1) against ``references`` (PIL images or
    ``[H, W, 3]`` arrays) with ``clip_vision`` (a :class:`ClipVisionEncoder`). Returns the report dict
    (schema in docs/evaluation.md). Missing optional models or packages are listed under ``skipped``."""
    options = options or EvaluationOptions()
    started = time.perf_counter()
    video = frames_to_uint8(frames)
    windows, skipped = check_inputs(video, len(references), options)
    for line in skipped:
        log.warning("%s", line)
    refs = [features.reference_tensor(r) for r in references]
    idx = sample_indices(int(video.shape[0]), options.samples)
    sampled = torch.from_numpy(video[idx])
    metrics, feats = _clip_metrics(clip_vision, sampled, refs, idx, options.regions)
    feature_name = "CLIP (class token; no DINOv2 checkpoint given)"
    if options.dino:
        dino = features.load_dino(options.dino, device=getattr(clip_vision, "device", "cpu"))
        feats = features.dino_features(dino, sampled)
        ref_feats = torch.cat([features.dino_features(dino, r) for r in refs])
        metrics["dino_i"] = _similarity("DINO-I subject similarity", f"DINOv2 ({options.dino})",
                                        "cos(DINOv2(reference), DINOv2(frame))", features.DINO_PREPROCESSING,
                                        ref_feats, feats, idx)
        feature_name = "DINOv2 (class token), as VBench"
    if options.face_models and faces.missing_package() is None:
        metrics["face_similarity"] = _face_metric(options.face_models, video[idx], refs, idx)
    metrics.update(_temporal_metrics(video, feats, feature_name, idx, options.flow_method))
    names = reference_names or [f"reference {i + 1}" for i in range(len(refs))]
    return {
        "schema": SCHEMA, "not_opens2v": NOT_OPENS2V,
        "video": {"source": source, "frames": int(video.shape[0]), "height": int(video.shape[1]),
                  "width": int(video.shape[2]), "fps": fps},
        "prompt": {"text": options.prompt, "note": "recorded only; no text-video score is computed"},
        "references": [{"index": i, "name": name, "height": int(r.shape[1]), "width": int(r.shape[2])}
                       for i, (name, r) in enumerate(zip(names, refs))],
        "sampling": {"frames": idx, "rule": f"{len(idx)} frames evenly spaced from first to last (similarity and "
                                            "subject consistency); flickering uses every consecutive pair, motion the pair "
                                            "ending at each sampled frame"},
        "metrics": metrics, "windows": window_means(windows, curves(metrics)), "skipped": skipped,
        "seconds": round(time.perf_counter() - started, 3),
    }


def summary_text(report: dict[str, Any]) -> str:
    """A few lines for people: each metric's overall value, the window means, what was skipped."""
    lines = [f"BindWeave evaluation of {report['video']['frames']} frames ({len(report['sampling']['frames'])} "
             "sampled). Not OpenS2V-Eval scores."]
    for key, metric in report["metrics"].items():
        value = metric.get("overall")
        text = "n/a" if value is None else f"{value:.4f}"
        per_ref = ", ".join(f"{report['references'][e['reference']]['name']}: "
                            + ("n/a" if e.get("mean") is None else f"{e['mean']:.4f}")
                            for e in metric.get("per_reference", []))
        lines.append(f"  {key}: {text}" + (f" ({per_ref})" if per_ref else ""))
    for w in report["windows"]:
        means = ", ".join(f"{k} {v:.4f}" for k, v in w["means"].items() if v is not None)
        lines.append(f"  window [{w['start']}, {w['end']}): {means}")
    lines += [f"  skipped: {line}" for line in report["skipped"]]
    return "\n".join(lines)

"""``python -m bindweave_core evaluate VIDEO --ref A.png [...] --json OUT.json --plot OUT.png``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..errors import InputError

log = logging.getLogger("BindWeave")
DEFAULT_SAMPLES = 32  # report.DEFAULT_SAMPLES (not imported here: report imports torch, --help must be fast)


def add_evaluate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate", help="score a video against its reference images (CLIP-I, consistency, flickering, motion)",
        description="Score any video against 1 or more reference images with local models: CLIP-I per reference "
                    "(the CLIP ViT-H vision file), optional DINO-I and ArcFace face similarity, VBench's subject "
                    "consistency and temporal flickering, and optical-flow motion; per frame, overall and per context "
                    "window. These are not OpenS2V-Eval scores (see docs/evaluation.md).")
    p.add_argument("video", help="the video file (any format PyAV reads)")
    p.add_argument("--ref", action="append", required=True, metavar="IMG", help="reference image (repeat)")
    p.add_argument("--prompt", help="the prompt, recorded in the JSON only (no text score is computed)")
    p.add_argument("--json", metavar="OUT.json", help="write the report here")
    p.add_argument("--plot", metavar="OUT.png", help="write the per-frame plot here")
    p.add_argument("--clip-vision", metavar="FILE", help="CLIP ViT-H/14 vision file (clip_vision_h.safetensors) "
                                                         "or a diffusers image_encoder folder")
    p.add_argument("--smoke", action="store_true", help="use the built-in tiny random CLIP (for testing)")
    p.add_argument("--dino", metavar="DIR", help="a transformers DINOv2 folder (e.g. facebook/dinov2-base): adds "
                                                 "DINO-I and computes subject consistency on DINOv2 as VBench does")
    p.add_argument("--face-models", metavar="DIR", help="an InsightFace model pack folder (e.g. buffalo_l) for "
                                                        "ArcFace face similarity; needs the optional insightface "
                                                        "and onnxruntime packages; non-commercial model licence")
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES,
                   help=f"frames sampled evenly for the similarity metrics, 0 = all (default {DEFAULT_SAMPLES})")
    p.add_argument("--regions", action="store_true",
                   help="also score the best-matching half-size region of each frame (10x the CLIP work)")
    p.add_argument("--windows", metavar="S:E,...", help="context windows as [start, end) frame ranges, e.g. "
                                                        "'0:33,24:57' (default: the 'windows' field of VIDEO's "
                                                        ".json sidecar, if any)")
    p.add_argument("--flow", choices=("farneback", "torch-lucas-kanade"),
                   help="optical flow for the motion amplitude (default: farneback when OpenCV is installed)")
    p.add_argument("--device", help="cuda, cpu (default: cuda if available)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), help="CLIP precision (default: bf16 on CUDA, "
                                                                      "fp32 on CPU)")
    p.set_defaults(func=run_evaluate)


def _check_args(args: argparse.Namespace) -> tuple[Path | None, Path | None]:
    from ..preflight import check_device, check_images, check_model_paths, check_output_file
    from . import faces, features

    if not args.json and not args.plot:
        raise InputError("give --json OUT.json and/or --plot OUT.png: nothing would be written.")
    video = Path(args.video).expanduser()
    if not video.is_file():
        raise InputError(f"video {video} not found. Check the path.")
    if not args.smoke and not args.clip_vision:
        raise InputError("give --clip-vision clip_vision_h.safetensors (the CLIP ViT-H/14 vision file), or --smoke "
                         "for the tiny random test CLIP.")
    check_images(args.ref)
    check_model_paths({"--clip-vision": None if args.smoke else args.clip_vision})
    if args.dino:
        features.check_dino_dir(args.dino)
    if args.face_models:
        faces.check_face_dir(args.face_models)
    check_device(args.device)
    inputs = [str(video), *args.ref, args.clip_vision, args.dino, args.face_models]
    json_out = check_output_file(args.json, inputs, "--json", ".json") if args.json else None
    plot_out = check_output_file(args.plot, inputs, "--plot", ".png") if args.plot else None
    if json_out is not None and plot_out is not None and json_out.resolve() == plot_out.resolve():
        raise InputError("--json and --plot name the same file.")
    return json_out, plot_out


def _clip(args: argparse.Namespace):
    import torch

    from ..dtypes import torch_dtype
    from ..encoders.clip_vision import ClipVisionEncoder

    if args.smoke:
        return ClipVisionEncoder.tiny(0)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch_dtype(args.dtype) if args.dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    return ClipVisionEncoder.load(args.clip_vision, dtype=dtype, device=device)


def run_evaluate(args: argparse.Namespace) -> int:
    from ..references import load_image
    from ..video_io import atomic_path, read_video, write_json
    from .plot import draw_plot
    from .report import EvaluationOptions, evaluate_video, summary_text
    from .windows import parse_windows, sidecar_windows

    json_out, plot_out = _check_args(args)
    frames, fps = read_video(args.video)
    windows, where = (args.windows, "--windows") if args.windows else sidecar_windows(args.video)
    parse_windows(windows, len(frames))  # a bad window fails here, before the model loads
    if where is not None and windows:
        log.info("context windows from %s", where)
    refs = [load_image(r) for r in args.ref]
    options = EvaluationOptions(samples=args.samples, regions=args.regions, dino=args.dino,
                                face_models=args.face_models, flow_method=args.flow, windows=windows,
                                prompt=args.prompt)
    report = evaluate_video(frames, refs, _clip(args), options, fps=fps, source=str(args.video),
                            reference_names=[str(r) for r in args.ref])
    report["windows_source"] = str(where) if windows else None
    if json_out is not None:
        write_json(report, json_out)
    if plot_out is not None:
        with atomic_path(plot_out) as tmp:
            draw_plot(report).save(tmp, format="PNG")
    sys.stdout.write(summary_text(report) + "\n")
    written = [str(p) for p in (json_out, plot_out) if p is not None]
    log.info("wrote %s", " and ".join(written))
    return 0

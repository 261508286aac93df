"""Long videos with context windows, on the smoke models (CPU): memory flat in length, and what each window saw.

Two reports:

* ``--rss``: peak resident memory of the whole ``generate`` command (conditioning, windowed sampling, the
  chunked decode into the MP4 writer) at two lengths with the same window and size, each in its own
  process; the issue's acceptance asks the longer run to stay within 1.15x of the shorter.
* default: one windowed generation with a hook on the DiT, reporting per window the reference
  conditioning it saw (digests of the UMT5, planner, CLIP and slot tensors: identical in every window) and
  its video condition's length, and per seam (frames shared by neighbouring windows) the disagreement
  between the two windows' velocities there, RMS relative to the velocity's RMS, averaged over steps (what
  the fuse averages away; a measure of the seam, not of identity, which needs the evaluation feature).

    python benchmarks/long_video.py --rss [--frames 41 161 --context-frames 33 --context-overlap 8]
    python benchmarks/long_video.py [--frames 81 --context-frames 33 --context-overlap 8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
EXAMPLE = REPO / "examples/singleface_1/man.png"


def peak_rss(frames: int, args: argparse.Namespace) -> tuple[int, int]:
    """``(peak RSS in KiB, frames written)`` of one generate command run in a child process."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "long.mp4"
        command = [sys.executable, "-m", "bindweave_core", "generate", "--smoke", "--ref", str(EXAMPLE), "--prompt",
                   "a man walks along a beach", "--width", str(args.width), "--height", str(args.height), "--frames",
                   str(frames), "--context-frames", str(args.context_frames), "--context-overlap",
                   str(args.context_overlap), "--steps", str(args.steps), "--out", str(out)]
        # the child reports its own peak (ru_maxrss of a process is its own high-water mark)
        wrapper = ("import resource, runpy, sys; sys.argv = sys.argv[1:]; "
                   "code = 0\ntry:\n runpy.run_module('bindweave_core', run_name='__main__')\n"
                   "except SystemExit as e:\n code = e.code or 0\n"
                   "print('PEAK_RSS_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
                   "sys.exit(code)")
        run = subprocess.run([sys.executable, "-c", wrapper, *command[1:]], cwd=REPO, capture_output=True, text=True)
        if run.returncode != 0:
            raise SystemExit(run.stderr[-3000:])
        peak = int(next(line.split()[1] for line in run.stderr.splitlines() if line.startswith("PEAK_RSS_KIB")))
        sidecar = json.loads(out.with_suffix(".json").read_text())
        return peak, sidecar["frames_written"]


def report_rss(args: argparse.Namespace) -> None:
    rows = []
    for frames in args.frames:
        peak, written = peak_rss(frames, args)
        rows.append((frames, peak, written))
        print(f"{frames:5d} frames: peak RSS {peak / 1024:8.1f} MiB, {written} frames written")
    base = rows[0][1]
    for frames, peak, _ in rows[1:]:
        print(f"{frames} vs {rows[0][0]} frames: {peak / base:.3f}x (target within 1.15x)")


def report_windows(args: argparse.Namespace) -> None:
    import torch

    import bindweave_core.pipeline as P
    from bindweave_core.condition_cache import tensor_digest
    from bindweave_core.pipeline import BindWeavePipeline, GenerationSettings

    pipe = BindWeavePipeline.smoke(seed=0)
    settings = GenerationSettings(prompt="a man walks along a beach", width=args.width, height=args.height,
                                  num_frames=args.frames[0], steps=args.steps, context_frames=args.context_frames,
                                  context_overlap=args.context_overlap)
    windows = settings.windows()
    seen: list[dict] = []

    def record(module, a, kw):
        seen.append({"frames": int(a[0].shape[2]), "text": tensor_digest(a[2]), "clip": tensor_digest(a[3]),
                     "planner": tensor_digest(kw["planner_states"]),
                     "slots": tensor_digest(kw["condition"][:, :, :4].contiguous())})

    outputs: list[torch.Tensor] = []  # each window's velocity (anchor dropped), in call order
    original = P.windowed_predictor

    def recording_windowed_predictor(wins, predictor_for, *rest, **kw):
        def recording_for(frames):
            predict = predictor_for(frames)
            return lambda x, t, which: outputs.append(predict(x, t, which)) or outputs[-1]

        return original(wins, recording_for, *rest, **kw)

    P.windowed_predictor = recording_windowed_predictor
    handle = pipe.component("dit").register_forward_pre_hook(record, with_kwargs=True)
    try:
        pipe.generate([EXAMPLE], settings)
    finally:
        handle.remove()
        P.windowed_predictor = original

    print(f"{settings.num_frames} frames, windows of {settings.context_frames} overlapping {settings.context_overlap}, "
          f"{settings.steps} steps, {len(windows)} windows")
    first = seen[0]
    for i, (window, call) in enumerate(zip(windows, seen)):
        same = all(call[k] == first[k] for k in ("text", "clip", "planner", "slots"))
        print(f"window {i + 1}: latent frames {window.frames[0]}-{window.frames[-1]}, anchor {window.anchor}, DiT clip "
              f"{call['frames']} latent frames; references identical to window 1: {same} "
              f"(slots {call['slots'][:12]}, CLIP {call['clip'][:12]})")
    assert all(c[k] == first[k] for c in seen for k in ("text", "clip", "planner", "slots"))
    n = len(windows)
    for i in range(n - 1):
        a, b = windows[i], windows[i + 1]
        shared = sorted(set(a.frames) & set(b.frames))
        if not shared:
            continue
        errors = []
        for step in range(settings.steps):
            va, vb = outputs[step * n + i], outputs[step * n + i + 1]
            skip_a, skip_b = (1 if a.anchor is not None else 0), (1 if b.anchor is not None else 0)
            pa = va[:, :, [skip_a + a.frames.index(f) for f in shared]].float()
            pb = vb[:, :, [skip_b + b.frames.index(f) for f in shared]].float()
            errors.append(((pa - pb).pow(2).mean().sqrt() / pa.pow(2).mean().sqrt()).item())
        print(f"seam {i + 1}-{i + 2}: {len(shared)} shared latent frames, velocity disagreement "
              f"{sum(errors) / len(errors):.3f} (relative RMS, mean over steps)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rss", action="store_true", help="peak RSS of the generate command at each --frames")
    ap.add_argument("--frames", type=int, nargs="+")
    ap.add_argument("--width", type=int, default=416)
    ap.add_argument("--height", type=int, default=240)
    ap.add_argument("--context-frames", type=int, default=33)
    ap.add_argument("--context-overlap", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args()
    if args.rss:
        args.frames = args.frames or [41, 161]
        report_rss(args)
    else:
        args.frames = args.frames or [81]
        report_windows(args)


if __name__ == "__main__":
    main()

"""Measure what keeping the sampler state in fp32 (ours) instead of bf16 (official) changes.

Runs the official UniPC trajectories of ``shared/data/official-schedule/`` (synthetic velocity field)
twice with our solver: state in float32 and state in bfloat16, and prints how far the final latents are
from each other and from the official fp32 result. The figures are quoted in ``docs/fidelity.md``.

    python tools/fidelity_state_dtype.py [--shared ../shared]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bindweave_core.sampling import make_scheduler  # noqa: E402


def field(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.8 * torch.tanh(x) + 0.2 * torch.sin(3 * x + t.float() / 250)


def run(x0: torch.Tensor, shift: float, steps: int, state: torch.dtype, bf16_model: bool) -> torch.Tensor:
    solver = make_scheduler("unipc", shift)
    solver.set_timesteps(steps)
    x = (x0.bfloat16() if bf16_model else x0).to(state)
    for t in solver.timesteps:
        v = field(x.bfloat16(), t) if bf16_model else field(x, t)  # bf16_model: a bf16 "DiT" in both runs
        x = solver.step(v.to(state), t, x)[0]
    return x.float()


def stats(a: torch.Tensor, b: torch.Tensor) -> str:
    d = a - b
    rel = (d.pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()
    return f"max {d.abs().max().item():.4f}  mean {d.abs().mean().item():.5f}  relative RMS {100 * rel:.2f} %"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shared", default=str(REPO.parent / "shared"))
    args = p.parse_args()
    data = json.loads((Path(args.shared) / "data/official-schedule/unipc_official.json").read_text())
    x0 = torch.tensor(data["trajectory_inputs"]["x0_values"], dtype=torch.float32).view(1, 16, 3, 6, 8)
    for entry in data["trajectories"]:
        shift, steps = entry["shift"], entry["steps"]
        official = torch.tensor(entry["final"], dtype=torch.float32).view_as(x0)
        fp32 = run(x0, shift, steps, torch.float32, bf16_model=False)
        bf16 = run(x0, shift, steps, torch.bfloat16, bf16_model=False)
        print(f"shift {shift}, {steps} steps (official latents up to {official.abs().max().item():.2f}):")
        print(f"  fp32 state vs official fp32 run: {stats(fp32, official)}")
        print(f"  everything bf16 vs fp32:         {stats(bf16, fp32)}")
        print(f"  state only (bf16 model in both): "
              f"{stats(run(x0, shift, steps, torch.bfloat16, True), run(x0, shift, steps, torch.float32, True))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

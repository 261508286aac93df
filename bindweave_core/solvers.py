"""Flow-matching solvers on a :class:`schedules.FlowGrid`: the official UniPC (bh2, order 2) and Euler.

Both keep diffusers' scheduler interface (``set_timesteps``, ``timesteps``, ``step(...)[0]``) so the
sampling loop reads like a diffusers pipeline, but the arithmetic is ours and fixed: it is the one of
diffusers 0.33.1's ``UniPCMultistepScheduler`` (``predict_x0``, ``flow_prediction``, ``bh2``,
``solver_order=2``, ``lower_order_final``, no thresholding, corrector on every step), operation for
operation, with the per-step coefficients computed as float32 scalars on the CPU as there. The state
(latents and the model's x0 predictions) stays in whatever dtype the caller gives (float32 here; the
official run kept bf16, see ``docs/fidelity.md``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .schedules import FlowGrid


class _GridSolver:
    """Common part: a grid made by ``make_grid(steps)``, a step counter, diffusers-like ``step``."""

    def __init__(self, make_grid: Callable[[int], FlowGrid]) -> None:
        self.make_grid = make_grid
        self.timesteps: torch.Tensor | None = None
        self.sigmas: torch.Tensor | None = None
        self.step_index = 0

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        grid = self.make_grid(int(num_inference_steps))
        self.timesteps = grid.timesteps.to(device) if device is not None else grid.timesteps
        self.sigmas = grid.sigmas  # stays on the CPU: the coefficients are scalars
        self.step_index = 0
        self._reset()

    def _reset(self) -> None:
        pass

    def step(self, model_output: torch.Tensor, timestep: torch.Tensor | float, sample: torch.Tensor,
             return_dict: bool = False) -> tuple[torch.Tensor]:
        """Advance ``sample`` from ``sigmas[i]`` to ``sigmas[i+1]`` (``timestep`` is only for the interface)."""
        if self.sigmas is None:
            raise RuntimeError("call set_timesteps before step")
        if self.step_index >= len(self.timesteps):
            raise RuntimeError(f"all {len(self.timesteps)} steps are done; call set_timesteps again")
        prev = self._step(model_output, sample)
        self.step_index += 1
        return (prev,)

    def _step(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class FlowEulerSolver(_GridSolver):
    """``x + (sigma' - sigma) * v``, summed in float32 (as diffusers' ``FlowMatchEulerDiscreteScheduler``)."""

    def _step(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        dt = self.sigmas[self.step_index + 1] - self.sigmas[self.step_index]
        return (sample.to(torch.float32) + dt * model_output).to(model_output.dtype)


def _alpha_sigma(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return 1 - sigma, sigma  # flow sigmas: x_t = (1 - sigma) * x0 + sigma * noise


def _lambda(sigma: torch.Tensor) -> torch.Tensor:
    alpha, sigma = _alpha_sigma(sigma)
    return torch.log(alpha) - torch.log(sigma)


class UniPCSolver(_GridSolver):
    """UniPC multistep (B(h) = e^h - 1, i.e. ``bh2``) on data predictions, order 2, lower order at the end.

    Each step: the model's velocity ``v`` becomes ``x0 = x - sigma * v``; from the second step on the
    previous prediction is corrected with it (UniC), then the next sample is predicted (UniP), first
    order at the first and last step, second order between.
    """

    order = 2

    def _reset(self) -> None:
        self.model_outputs: list[torch.Tensor | None] = [None] * self.order  # x0 predictions, newest last
        self.last_sample: torch.Tensor | None = None
        self.lower_order_nums = 0
        self.this_order = 1

    def _step(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        i = self.step_index
        x0 = sample - self.sigmas[i] * model_output
        if i > 0 and self.last_sample is not None:
            sample = self._corrector(x0, self.last_sample, sample, self.this_order)
        self.model_outputs = self.model_outputs[1:] + [x0]
        this_order = min(self.order, len(self.timesteps) - i)  # lower_order_final
        self.this_order = min(this_order, self.lower_order_nums + 1)  # warm-up
        self.last_sample = sample
        prev = self._predictor(sample, self.this_order)
        self.lower_order_nums = min(self.lower_order_nums + 1, self.order)
        return prev

    def _coefficients(self, t: int, s0: int) -> tuple[torch.Tensor, ...]:
        sigma_t, sigma_s0 = self.sigmas[t], self.sigmas[s0]
        alpha_t, _ = _alpha_sigma(sigma_t)
        h = _lambda(sigma_t) - _lambda(sigma_s0)
        hh = -h  # predict_x0
        h_phi_1 = torch.expm1(hh)  # h * phi_1(h) = e^h - 1
        b_h = torch.expm1(hh)  # bh2
        return sigma_t, sigma_s0, alpha_t, h, hh, h_phi_1, b_h

    def _predictor(self, x: torch.Tensor, order: int) -> torch.Tensor:
        i = self.step_index
        m0 = self.model_outputs[-1]
        sigma_t, sigma_s0, alpha_t, h, _, h_phi_1, b_h = self._coefficients(i + 1, i)
        x_t = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0
        if order == 2:  # rho = 1/2, the simplified second-order predictor
            rk = (_lambda(self.sigmas[i - 1]) - _lambda(sigma_s0)) / h
            d1 = (self.model_outputs[-2] - m0) / rk
            x_t = x_t - alpha_t * b_h * (0.5 * d1)
        return x_t.to(x.dtype)

    def _corrector(self, model_t: torch.Tensor, x: torch.Tensor, x_t: torch.Tensor, order: int) -> torch.Tensor:
        i = self.step_index
        m0 = self.model_outputs[-1]
        sigma_t, sigma_s0, alpha_t, h, hh, h_phi_1, b_h = self._coefficients(i, i - 1)
        rks: list[torch.Tensor | float] = []
        d1 = None
        if order == 2:
            rk = (_lambda(self.sigmas[i - 2]) - _lambda(sigma_s0)) / h
            rks.append(rk)
            d1 = (self.model_outputs[-2] - m0) / rk
        rks.append(1.0)
        rks_t = torch.tensor(rks)
        # R rows rks^0, rks^1, ...; b_k = k! * h_phi_k / B(h), h_phi_{k+1} = h_phi_k / hh - 1 / (k+1)!
        rows, b = [], []
        h_phi_k = h_phi_1 / hh - 1
        factorial = 1
        for k in range(1, order + 1):
            rows.append(torch.pow(rks_t, k - 1))
            b.append(h_phi_k * factorial / b_h)
            factorial *= k + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        if order == 1:
            rhos = torch.tensor([0.5], dtype=x.dtype)
        else:
            rhos = torch.linalg.solve(torch.stack(rows), torch.tensor(b)).to(x.dtype)
        corr = rhos[0] * d1 if d1 is not None else 0
        x_corr = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0
        x_corr = x_corr - alpha_t * b_h * (corr + rhos[-1] * (model_t - m0))
        return x_corr.to(x.dtype)

"""What the four encoders have in common: the UMT5 ``TextEncoder``, the ``ClipVisionEncoder``, the ``WanVAE``
and the Qwen2.5-VL ``Planner``.

Each wraps one ``nn.Module`` (``model``) and offers the same construction and inspection:

* ``load(path, *, dtype=..., device=..., **options)``: the weights from a file or folder, read lazily;
* ``tiny(seed=0)``: a tiny random model of the real architecture, built in memory (smoke runs, tests);
* ``device`` / ``dtype``: where the model runs and in which compute precision;
* ``inspect_report(path, infos, metadata)``: the model's part of ``python -m bindweave_core inspect``;
* ``source`` (what it was loaded from) and ``checkpoint_info`` (what the file held; None for tiny models).

The pipeline, the CLI and the ComfyUI nodes hold encoders as :class:`Encoder`.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..checkpoints.materialize import ScannedCheckpoint
from ..checkpoints.safetensors_io import TensorInfo, read_header

log = logging.getLogger("BindWeave")


class Encoder(ABC):
    """One of the conditioning models (see the module docstring for the protocol)."""

    checkpoint_info: ScannedCheckpoint | None

    def __init__(self, model: torch.nn.Module, *, source: str = "") -> None:
        self.model = model
        self.source = source
        self.checkpoint_info = None  # set by load()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (subclasses read it off a weight that is never stored as fp8)."""
        return next(self.model.parameters()).dtype

    @classmethod
    @abstractmethod
    def load(cls, path: str | os.PathLike, *, dtype: torch.dtype = torch.bfloat16,
             device: str | torch.device = "cpu", **options: Any) -> Encoder:
        """The model from its file(s), each tensor read from the memory-mapped file and cast on its way in."""

    @classmethod
    @abstractmethod
    def tiny(cls, seed: int = 0) -> Encoder:
        """A tiny random model of the real architecture, with weights drawn from ``seed`` only."""

    @staticmethod
    @abstractmethod
    def inspect_report(path: Path, infos: dict[str, TensorInfo], metadata: dict[str, str]) -> dict:
        """This model's part of the ``inspect`` report, from the file's headers."""

    def loaded_from(self, ckpt: ScannedCheckpoint) -> Encoder:
        """Record what the file held, on the encoder and on its module (where the condition cache looks)."""
        self.checkpoint_info = ckpt
        self.model.checkpoint_info = ckpt
        return self


# ------------------------------------------------------------------------------------------ helpers
def seeded_init_(model: torch.nn.Module, seed: int,
                 value: Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    """Deterministic random weights, independent of the global RNG and of the library's init: one normal
    draw per parameter, in name order, turned into the parameter's values by ``value(name, param, noise)``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            p.copy_(value(name, p, torch.randn(p.shape, generator=g)))


def header(path: str | os.PathLike, infos: dict[str, TensorInfo] | None) -> tuple[Path, dict[str, TensorInfo]]:
    """``(path, tensors)``: the tensors given (the ``inspect`` command has read them), else read from ``path``."""
    path = Path(path)
    if infos is None:
        infos, _ = read_header(path)
    return path, infos


def size_differences(config: dict[str, Any], reference: dict[str, Any], keys: tuple[str, ...],
                     name: str) -> list[str]:
    """How a model's sizes differ from the released model ``name`` (empty for the real one)."""
    return [f"{k} {config.get(k)} ({name}: {reference[k]})" for k in keys if config.get(k) != reference[k]]


def check_before_load(ckpt: ScannedCheckpoint, model: str, component: str, differences: list[str],
                      released: str) -> None:
    """Stop on missing or misshapen tensors; warn when the sizes are not the released model's."""
    ckpt.require_matching_keys(model, component)
    if differences:
        log.warning("%s is not %s: %s", ckpt.path, released, ", ".join(differences))


def problems_and_sizes(ckpt: ScannedCheckpoint, differences: list[str], released: str) -> list[str]:
    """The ``inspect`` problems: key problems, and sizes that are not the released model's."""
    problems = ckpt.problems()
    if differences:
        problems.append(f"not the {released} BindWeave needs: " + ", ".join(differences))
    return problems

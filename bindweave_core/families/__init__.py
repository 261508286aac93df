"""The model families, one object each: ``family_for(name or DiTConfig)`` says what a family does.

Pipeline, nodes, CLI and training ask the family object instead of branching on family names; see
:class:`~bindweave_core.families.base.ModelFamily` for what a family decides and the names used.
"""

from __future__ import annotations

from typing import Any

from ..config import FAMILIES
from ..errors import InputError
from .base import ModelFamily, ReferenceHost
from .bindweave import BindWeaveFamily, WanI2VFamily, WanT2VFamily
from .kaleido import KaleidoFamily

__all__ = ["FAMILY_OBJECTS", "ModelFamily", "ReferenceHost", "checkpoint_family", "family_for",
           "sigma_sampling_for", "sigma_sampling_family"]

FAMILY_OBJECTS: dict[str, ModelFamily] = {f.name: f for f in (BindWeaveFamily(), WanI2VFamily(), WanT2VFamily(),
                                                             KaleidoFamily())}


def family_for(family: str | Any) -> ModelFamily:
    """The family object of a family name, or of anything with a ``family`` field (a ``DiTConfig``)."""
    name = family if isinstance(family, str) else family.family
    if name not in FAMILY_OBJECTS:
        raise InputError(f"unknown model family {name!r}; choose one of {FAMILIES}.")
    return FAMILY_OBJECTS[name]


def checkpoint_family(*, planner: bool, image_embedder: bool, layout: str) -> str:
    """The family a DiT file without a recorded family is, from the tensors it has and its key layout.

    The connector's ``text_projector`` makes it BindWeave, an image embedder (CLIP input) plain Wan
    I2V; without either it is a text-to-video DiT, which in the SAT layout is Kaleido's release (the
    Kaleido-14B-S2V download is the only SAT-layout Wan DiT) and plain Wan T2V otherwise.
    """
    if planner:
        return BindWeaveFamily.name
    if image_embedder:
        return WanI2VFamily.name
    return KaleidoFamily.name if layout == "sat" else WanT2VFamily.name


def sigma_sampling_family(method: str) -> ModelFamily:
    """The family whose training draw ``objective.sigma_sampling: method`` names (shifted, kaleido)."""
    for family in FAMILY_OBJECTS.values():
        if family.sigma_sampling == method:
            return family
    raise InputError(f"unknown sigma sampling {method!r}; choose one of "
                     f"{sorted({f.sigma_sampling for f in FAMILY_OBJECTS.values()})}.")


def sigma_sampling_for(conditioning: str) -> str:
    """``objective.sigma_sampling: auto``: the draw of the family trained with ``conditioning``
    (Kaleido's for ``rrope``), the shifted schedule of spec section 12 for any other mode."""
    trained = [f for f in FAMILY_OBJECTS.values() if f.trained_for_references and f.conditioning == conditioning]
    return trained[0].sigma_sampling if trained else BindWeaveFamily.sigma_sampling

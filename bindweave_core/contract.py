"""What a conditioning was made for, stated once and checked against every latent the DiT is given.

The DiT could infer the reference slot count as "condition frames minus latent frames", which turns a
latent of the wrong length into misaligned slots and a wrong video with no error. Instead the
conditioning (ours and the native CONDITIONING) carries a :class:`ConditionContract`: its family, its
reference slot count, the latent frames and the pixel size it was made for. Every DiT call (our Sampler,
the native MODEL, each context window: a window's latent against the window's contract) checks the latent
against it and names both sides when they differ.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from . import constants as C
from .errors import InputError


def pixel_frames(latent_frames: int) -> int:
    """Video frames ``4(T-1)+1`` of ``T`` latent frames."""
    return (latent_frames - 1) * C.VAE_TEMPORAL_FACTOR + 1


def _frames(latent_frames: int) -> str:
    n = pixel_frames(latent_frames)
    return f"{n} frame{'' if n == 1 else 's'} ({latent_frames} latent)"


def describe_latent(shape: Sequence[int]) -> str:
    """A latent shape as a user reads it (frames and pixel size), e.g. ``17 frames at 416x240``."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 5:
        return f"a {len(shape)}-D latent {list(shape)} (an image latent, not a video)"
    _, channels, frames, h, w = shape
    what = f"{_frames(frames)} at {w * C.VAE_SPATIAL_FACTOR}x{h * C.VAE_SPATIAL_FACTOR}"
    return what if channels == C.LATENT_CHANNELS else f"{what} with {channels} channels"


@dataclass(frozen=True)
class ConditionContract:
    """The video a conditioning was made for: ``family`` (``bindweave_core.families``), ``slots`` (reference
    frames in front of the video: 4 for slot families, 0 for R-RoPE), ``conditioning`` (how they reach the
    DiT), ``in_channels`` (of a DiT that takes them), ``references`` (images encoded),
    ``latent_frames`` and the pixel ``width`` x ``height``."""

    family: str
    conditioning: str  # "slots" | "rrope" (bindweave_core.families.base)
    in_channels: int  # the input channels of a DiT that takes these references (latent + condition channels)
    slots: int
    references: int
    latent_frames: int
    width: int
    height: int

    @property
    def num_frames(self) -> int:
        return pixel_frames(self.latent_frames)

    def describe(self) -> str:
        refs = f"{self.slots} reference slots" if self.slots else f"{self.references} reference latents"
        return (f"{_frames(self.latent_frames)} at {self.width}x{self.height} "
                f"({self.family}, {refs})")

    def for_window(self, latent_frames: int) -> "ConditionContract":
        """The contract of a context window of ``latent_frames`` (same references, window-length video)."""
        return replace(self, latent_frames=int(latent_frames))

    def latent_shape(self) -> tuple[int, int, int, int, int]:
        return (1, C.LATENT_CHANNELS, self.latent_frames, self.height // C.VAE_SPATIAL_FACTOR,
                self.width // C.VAE_SPATIAL_FACTOR)

    def check_latent(self, shape: Sequence[int], where: str = "") -> None:
        """Refuse a latent that is not the video this conditioning was made for, naming both."""
        shape = tuple(int(s) for s in shape)
        if len(shape) == 5 and shape[1:] == self.latent_shape()[1:]:
            return
        place = f" ({where})" if where else ""
        raise InputError(f"the latent is {describe_latent(shape)} but the conditioning was made for "
                         f"{self.describe()}{place}: make the latent with the same length, width and height as "
                         "Reference Encode (BindWeave Conditioning's latent output has them), or encode "
                         "the references again for this latent.")

    def check_model(self, config) -> None:
        """Refuse a DiT (its ``DiTConfig``) that cannot take these references: slot conditioning needs the
        condition channels in the DiT's input, R-RoPE latents a DiT without them."""
        needed = self.in_channels
        if config.in_channels != needed:
            raise InputError(f"the conditioning holds {self.family} references ({self.conditioning}) but the model "
                             f"is a {config.family} DiT ({config.in_channels} input channels, {needed} needed): set "
                             "Reference Encode's mode to the loaded DiT's family.")

    def check_tensors(self, condition=None, reference_latents=None) -> None:
        """The tensors carried with the contract agree with it (a window's condition with the window)."""
        if condition is not None and int(condition.shape[2]) != self.slots + self.latent_frames:
            raise InputError(f"the video condition holds {int(condition.shape[2]) - self.slots} latent frames but "
                             f"the conditioning states {self.describe()}; encode the references again.")
        if reference_latents is not None and int(reference_latents.shape[1]) != self.references:
            raise InputError(f"{int(reference_latents.shape[1])} reference latents given but the conditioning "
                             f"states {self.describe()}; encode the references again.")

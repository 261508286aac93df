"""The Wan 2.1 VAE (diffusers' ``AutoencoderKLWan``): loading, normalised encode/decode, conditions.

Files it loads:

* the Hugging Face folder ``Wan-AI/Wan2.1-I2V-14B-720P-Diffusers/vae`` (``config.json`` +
  ``diffusion_pytorch_model.safetensors``; the repository root with a ``vae/`` folder works too);
* ComfyUI's single file ``wan_2.1_vae.safetensors`` in the original Wan key layout
  (``encoder.conv1``, ``encoder.downsamples.N.residual.*``, ``decoder.upsamples.N.*``, ``conv1``,
  ``conv2``, ...). diffusers' own ``convert_wan_vae_to_diffusers`` gives the diffusers names; it only
  renames keys (every tensor keeps its shape), so it is fed ``{stored key: stored key}`` and the
  tensors themselves are read lazily from the memory-mapped file by ``materialize``.

Latents are normalised per channel with the config's ``latents_mean`` / ``latents_std`` (spec
sections 1, 8, 11): ``encode`` returns ``(mu - mean) / std`` of the posterior mean (no sampling, as
the official ``do_sample: false``), ``decode`` takes ``z`` and decodes ``z * std + mean``. The
normalisation runs in float32 and both return float32 (the official code does the decode-side
arithmetic in bf16; float32 is the accepted, more accurate deviation).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import constants as C
from ..checkpoints.identify import describe, identify
from ..checkpoints.materialize import ScannedCheckpoint, materialize
from ..checkpoints.safetensors_io import TensorInfo, component_dir, read_header
from ..conditioning import pad_slots, reference_slot, vae_condition
from ..conditioning import video_condition as assemble_video_condition
from ..errors import CheckpointError, InputError
from ..model_files import where_to_get
from ..references import check_size
from ..setting_bounds import check_reference_count
from .base import Encoder, seeded_init_

log = logging.getLogger("BindWeave")

# The Wan 2.1 VAE as released (Wan-AI/Wan2.1-*-Diffusers/vae/config.json). The latents mean/std are
# the per-channel statistics of the original Wan code (wan/modules/vae.py), which diffusers also
# uses as AutoencoderKLWan's defaults; tests compare this table with diffusers' defaults.
WAN21_VAE_CONFIG: dict[str, Any] = {
    "base_dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_scales": [],
    "temperal_downsample": [False, True, True], "dropout": 0.0,
    "latents_mean": [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                     0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
    "latents_std": [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160],
}
# The smoke model: same structure and 4x/8x factors at width 8, with non-trivial statistics so a
# missing or inverted normalisation shows in tests.
TINY_VAE_CONFIG: dict[str, Any] = {
    **WAN21_VAE_CONFIG,
    "base_dim": 8,
    "latents_mean": [round(0.4 * math.sin(1.3 * i + 0.5), 4) for i in range(C.LATENT_CHANNELS)],
    "latents_std": [round(0.55 + 0.125 * i, 4) for i in range(C.LATENT_CHANNELS)],
}
CONFIG_METADATA_KEY = "bindweave_vae_config"  # our own single files carry their config as JSON
DEFAULT_TILE_SIZE = 256  # pixels, diffusers' defaults
DEFAULT_TILE_STRIDE = 192
_FAMILY = "wan2.1-vae"


# ---------------------------------------------------------------------------------------- scanning
@dataclass
class VAECheckpoint(ScannedCheckpoint):
    """What a VAE checkpoint holds, from its headers only."""

    path: Path
    layout: str  # diffusers | wan-original
    config: dict[str, Any]  # AutoencoderKLWan keyword arguments


def _locate(path: Path) -> tuple[Path, Path | None]:
    """``(weights to read, config.json or None)`` for a file, a ``vae`` folder or a repository root."""
    if not path.is_dir():
        beside = path.parent / "config.json"  # the weights file of an HF folder: its config applies
        return path, (beside if path.name.startswith("diffusion_pytorch_model") and beside.exists() else None)
    path = component_dir(path, "vae")  # the whole Wan-AI/...-Diffusers repository may be given
    config = path / "config.json"
    single = path / "diffusion_pytorch_model.safetensors"
    return (single if single.exists() else path), (config if config.exists() else None)


def _not_a_vae(path: Path, keys: list[str]) -> CheckpointError:
    return CheckpointError(f"{path}: this is not the Wan 2.1 VAE; it looks like {describe(keys)}. "
                           + where_to_get("vae"))


def _prefix(keys: list[str], marker: str) -> str:
    """Whatever a tool put in front of every key (``first_stage_model.``, ``vae.``, ...)."""
    for k in keys:
        if k.endswith(marker):
            prefix = k[: -len(marker)]
            if prefix == "" or prefix.endswith("."):
                return prefix
    return ""


def _shape(tensors: dict[str, TensorInfo], key: str, path: Path) -> tuple[int, ...]:
    if key not in tensors:
        raise CheckpointError(f"{path}: the VAE has no {key}: the file is incomplete. " + where_to_get("vae"))
    return tensors[key].shape


def _config_from(tensors: dict[str, TensorInfo], metadata: dict[str, str], config_json: Path | None,
                 path: Path) -> dict[str, Any]:
    """Constructor arguments: config.json, else our metadata, else Wan 2.1 with widths read off shapes."""
    import inspect

    from diffusers import AutoencoderKLWan

    allowed = set(inspect.signature(AutoencoderKLWan.__init__).parameters) - {"self"}
    if config_json is not None:
        try:
            raw = json.loads(config_json.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{config_json}: unreadable config ({e}); download it again.") from e
        cfg = {**WAN21_VAE_CONFIG, **{k: v for k, v in raw.items() if k in allowed}}
    elif CONFIG_METADATA_KEY in metadata:
        cfg = {**WAN21_VAE_CONFIG, **json.loads(metadata[CONFIG_METADATA_KEY])}
    else:
        conv_in = _shape(tensors, "encoder.conv_in.weight", path)
        conv_out = _shape(tensors, "decoder.conv_out.weight", path)
        cfg = dict(WAN21_VAE_CONFIG, base_dim=conv_in[0], in_channels=conv_in[1], out_channels=conv_out[0])
        if conv_out[1] != conv_in[0]:
            cfg["decoder_base_dim"] = conv_out[1]
    z_dim = _shape(tensors, "post_quant_conv.weight", path)[0] if "post_quant_conv.weight" in tensors else cfg["z_dim"]
    if cfg.get("is_residual") or z_dim != C.LATENT_CHANNELS or cfg["z_dim"] != C.LATENT_CHANNELS:
        raise CheckpointError(f"{path}: this VAE has {z_dim} latent channels (the Wan 2.2 VAE has 48); BindWeave "
                              f"needs the Wan 2.1 VAE with {C.LATENT_CHANNELS}. " + where_to_get("vae"))
    if cfg.get("in_channels", 3) != 3 or cfg.get("out_channels", 3) != 3:
        raise CheckpointError(f"{path}: this Wan-style VAE takes {cfg.get('in_channels')} image channels, not RGB; "
                              "BindWeave needs the Wan 2.1 VAE. " + where_to_get("vae"))
    return cfg


def _scan(path: Path, infos: dict[str, TensorInfo], metadata: dict[str, str],
          config_json: Path | None) -> VAECheckpoint:
    keys = list(infos)
    sig = identify(keys)
    if sig is None or sig.kind != "vae":
        raise _not_a_vae(path, keys)
    if sig.layout not in ("diffusers", "wan-original"):
        raise CheckpointError(f"{path}: this is {sig.description}; BindWeave needs the Wan 2.1 VAE (16 latent "
                              "channels). " + where_to_get("vae"))
    marker = "encoder.conv1.weight" if sig.layout == "wan-original" else "encoder.conv_in.weight"
    prefix = _prefix(keys, marker)
    own = {k[len(prefix):]: k for k in keys if k.startswith(prefix)}
    foreign = [k for k in keys if not k.startswith(prefix)]
    if sig.layout == "wan-original":
        from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

        own = convert_wan_vae_to_diffusers(own)  # renames only; values here are the stored key names
    tensors = {new: infos[old] for new, old in own.items()}
    cfg = _config_from(tensors, metadata, config_json, path)

    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in AutoencoderKLWan(**cfg).state_dict().items()}
    ckpt = VAECheckpoint(path=path, layout=sig.layout, config=cfg, tensors=tensors)
    ckpt.compare_keys(expected, foreign)
    if [round(float(v), 4) for v in cfg["latents_mean"]] != WAN21_VAE_CONFIG["latents_mean"] or \
            [round(float(v), 4) for v in cfg["latents_std"]] != WAN21_VAE_CONFIG["latents_std"]:
        log.info("%s: latents mean/std differ from the Wan 2.1 values; using the file's own", path)
    return ckpt


def scan_vae(path: str | os.PathLike) -> VAECheckpoint:
    """Read a VAE checkpoint's headers: layout, config and key problems (nothing is loaded)."""
    weights, config_json = _locate(Path(path))
    try:
        infos, metadata = read_header(weights)
    except CheckpointError as e:  # missing, pickled, truncated: say which file is expected
        raise CheckpointError(f"{e} {where_to_get('vae')}") from e
    return _scan(weights, infos, metadata, config_json)


def inspect_report(path: Path, infos: dict[str, TensorInfo], metadata: dict[str, str]) -> dict:
    """The VAE part of ``python -m bindweave_core inspect``."""
    _, config_json = _locate(Path(path))
    ckpt = _scan(Path(path), infos, metadata, config_json)
    summary = {k: ckpt.config.get(k) for k in ("base_dim", "z_dim", "dim_mult", "num_res_blocks",
                                                 "temperal_downsample")}
    return {"family": _FAMILY, "layout": ckpt.layout, "config": summary, "problems": ckpt.problems(),
            "extras": ckpt.extras()}


def _tiny_value(name: str, p: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    if name.endswith(".gamma"):
        return 1.0 + 0.1 * noise
    if name.endswith(".bias"):
        return 0.05 * noise
    return noise / math.sqrt(p[0].numel())  # keeps activations O(1) through the stack


# ---------------------------------------------------------------------------------------- checks
def _check_frames(num_frames: int) -> None:
    if num_frames < 1 or (num_frames - 1) % C.VAE_TEMPORAL_FACTOR:
        k = max(0, round((num_frames - 1) / C.VAE_TEMPORAL_FACTOR))
        raise InputError(f"frames must be 4k+1 (e.g. {4 * k + 1} or {4 * k + 5}), got {num_frames}.")


def _check_video(video: torch.Tensor) -> None:
    if video.ndim != 5 or video.shape[1] != 3:
        raise InputError(f"the VAE encodes videos [B, 3, N, H, W] in [-1, 1]; got shape {list(video.shape)}.")
    _check_frames(video.shape[2])
    check_size(int(video.shape[4]), int(video.shape[3]))


# ---------------------------------------------------------------------------------------- model
class WanVAE(Encoder):
    """The Wan 2.1 VAE with BindWeave's normalisation and reference/video conditions (spec 8, 11)."""

    inspect_report = staticmethod(inspect_report)

    def __init__(self, model: Any, source: str = "") -> None:
        super().__init__(model.eval().requires_grad_(False), source=source)  # diffusers AutoencoderKLWan

    # ---------------------------------------------------------------------------- construction
    @classmethod
    def load(cls, path: str | os.PathLike, *, dtype: torch.dtype = torch.bfloat16,
             device: str | torch.device = "cpu") -> WanVAE:
        """Load the HF ``vae`` folder or a single ``wan_2.1_vae.safetensors`` (original or diffusers keys).

        The model is built on the meta device and each tensor is read from the memory-mapped file and
        cast on its way in, so the weights are never held twice.
        """
        from diffusers import AutoencoderKLWan

        ckpt = scan_vae(path)
        ckpt.require_matching_keys("the Wan 2.1 VAE", "vae")
        with torch.device("meta"):
            model = AutoencoderKLWan(**ckpt.config)
        materialize(model, ckpt.tensors, dtype=dtype, device=device, strict=True, source=ckpt.path)
        log.info("loaded Wan 2.1 VAE (%s layout, %s) from %s", ckpt.layout, str(dtype).replace("torch.", ""),
                 ckpt.path)
        return cls(model, source=str(ckpt.path)).loaded_from(ckpt)

    @classmethod
    def tiny(cls, seed: int = 0, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> WanVAE:
        """A width-8 AutoencoderKLWan (real class, z 16, 4x/8x) with weights drawn from ``seed``.

        Does not touch the global RNG. Encodes + decodes a 9-frame 64x64 video in well under a second.
        """
        from diffusers import AutoencoderKLWan

        with torch.device("meta"):
            model = AutoencoderKLWan(**TINY_VAE_CONFIG)
        model = model.to_empty(device="cpu")
        seeded_init_(model, seed, _tiny_value)
        # nn.Module.to: diffusers' override warns about fp32 modules this class does not have
        return cls(torch.nn.Module.to(model, device=device, dtype=dtype), source=f"tiny (seed {seed})")

    # ---------------------------------------------------------------------------- placement
    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> WanVAE:
        torch.nn.Module.to(self.model, device=device, dtype=dtype)
        return self

    @property
    def latents_mean(self) -> torch.Tensor:
        return torch.tensor(self.model.config.latents_mean, dtype=torch.float32)

    @property
    def latents_std(self) -> torch.Tensor:
        return torch.tensor(self.model.config.latents_std, dtype=torch.float32)

    def _stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, -1, 1, 1, 1)
        return self.latents_mean.view(shape).to(device), self.latents_std.view(shape).to(device)

    # ---------------------------------------------------------------------------- tiling
    def enable_tiling(self, tile_size: int = DEFAULT_TILE_SIZE, tile_stride: int = DEFAULT_TILE_STRIDE) -> None:
        """Spatially tiled encode/decode for low memory (off by default; tiles blend over the overlap).

        ``tile_size`` / ``tile_stride`` are in pixels, multiples of 8, ``stride <= size``. Inputs no
        larger than one tile are processed whole.
        """
        f = C.VAE_SPATIAL_FACTOR
        if tile_size < f or tile_size % f or tile_stride < f or tile_stride % f or tile_stride > tile_size:
            raise InputError(f"VAE tiles must be multiples of {f} pixels with stride <= size; got size "
                             f"{tile_size}, stride {tile_stride}.")
        self.model.enable_tiling(tile_sample_min_height=tile_size, tile_sample_min_width=tile_size,
                                 tile_sample_stride_height=tile_stride, tile_sample_stride_width=tile_stride)

    def disable_tiling(self) -> None:
        self.model.use_tiling = False

    @property
    def tiling(self) -> bool:
        return bool(self.model.use_tiling)

    # ---------------------------------------------------------------------------- progress
    @contextmanager
    def chunk_progress(self, callback: Callable[[int], None]) -> Iterator[None]:
        """Call ``callback(chunks_done)`` before each causal chunk the encoder runs (encoding N frames takes
        ``constants.latent_frames(N)`` chunks: the first frame, then 4 at a time).

        diffusers' Wan VAE calls its encoder once per chunk (per tile when tiled), so a pre-hook there is
        the one place to report progress and to cancel (the callback raises) between chunks without
        reimplementing the chunk loop.
        """
        done = 0

        def before_chunk(module: torch.nn.Module, args: Any) -> None:
            nonlocal done
            callback(done)
            done += 1

        handle = self.model.encoder.register_forward_pre_hook(before_chunk)
        try:
            yield
        finally:
            handle.remove()

    # ---------------------------------------------------------------------------- encode / decode
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """``[B, 3, N, H, W]`` in [-1, 1] -> normalised posterior mean ``[B, 16, T, h, w]`` (float32)."""
        _check_video(video)
        with torch.no_grad():
            mu = self.model.encode(video.to(self.device, self.dtype)).latent_dist.mode()
        mean, std = self._stats(mu.device)
        return (mu.float() - mean) / std

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised ``[B, 16, T, h, w]`` -> video ``[B, 3, 4(T-1)+1, 8h, 8w]`` in [-1, 1] (float32)."""
        if latents.ndim != 5 or latents.shape[1] != C.LATENT_CHANNELS:
            raise InputError(f"the VAE decodes latents [B, {C.LATENT_CHANNELS}, T, h, w]; got shape "
                             f"{list(latents.shape)}.")
        mean, std = self._stats(self.device)
        z = latents.to(self.device, torch.float32) * std + mean
        with torch.no_grad():
            video = self.model.decode(z.to(self.dtype)).sample
        return video.float()

    # ---------------------------------------------------------------------------- conditions
    @staticmethod
    def _check_references(canvases: torch.Tensor, masks: torch.Tensor | None = None) -> None:
        if canvases.ndim != 4 or canvases.shape[-1] != 3:
            raise InputError(f"reference canvases must be [n, H, W, 3] in 0..1; got shape {list(canvases.shape)}.")
        if masks is not None and tuple(masks.shape) != tuple(canvases.shape[:3]):
            raise InputError(f"reference masks must be [n, H, W] = {list(canvases.shape[:3])}; got "
                             f"{list(masks.shape)}.")
        check_reference_count(int(canvases.shape[0]), C.NUM_REF_SLOTS, "BindWeave")
        check_size(int(canvases.shape[2]), int(canvases.shape[1]))

    def _encode_canvas(self, canvas: torch.Tensor) -> torch.Tensor:
        """One letterboxed canvas ``[H, W, 3]`` in 0..1 as a single frame -> ``[1, 16, 1, h, w]``."""
        frame = canvas.permute(2, 0, 1)[None, :, None].float()  # [1, 3, 1, H, W]
        return self.encode((frame - 0.5) / 0.5)

    def reference_latents(self, canvases: torch.Tensor) -> torch.Tensor:
        """Each canvas encoded alone (as the official code does) -> ``[1, n, 16, h, w]`` (R-RoPE families)."""
        self._check_references(canvases)
        return torch.stack([self._encode_canvas(c)[0, :, 0] for c in canvases])[None]

    def reference_slots(self, canvases: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Spec section 8: ``[1, 20, 4, h, w]``, slot k = ``[mask, 0, 0, 0, latent_k]``, unused slots zero."""
        self._check_references(canvases, masks)
        slots = [reference_slot(self._encode_canvas(c), m.to(self.device)) for c, m in zip(canvases, masks)]
        return pad_slots(slots)

    def video_condition(self, num_frames: int, height: int, width: int, cache: Any = None) -> torch.Tensor:
        """Spec section 8: 4 zero mask channels + the normalised latent of an all-zero video, ``[1, 20, T, h, w]``.

        Independent of the references, so kept in ``cache`` (a :class:`~bindweave_core.condition_cache.
        ConditionCache`; default the process-wide one) per (this VAE, frames, size, dtype, device, tiling).
        """
        from ..condition_cache import model_identity, shared_cache

        _check_frames(num_frames)
        check_size(width, height)
        identity, persistent = model_identity(self)
        tiling = ([self.model.tile_sample_min_height, self.model.tile_sample_min_width,
                   self.model.tile_sample_stride_height, self.model.tile_sample_stride_width]
                  if self.tiling else None)
        parts = {"vae": identity, "frames": num_frames, "height": height, "width": width, "dtype": str(self.dtype),
                 "device": str(self.device), "tiling": tiling}

        def encode_zero_video() -> dict[str, torch.Tensor]:
            zeros = torch.zeros(1, 3, num_frames, height, width, dtype=self.dtype, device=self.device)
            return {"video_condition": assemble_video_condition(self.encode(zeros))}

        cache = cache if cache is not None else shared_cache()
        entry = cache.get("video", parts, encode_zero_video, persistent=persistent)
        return entry["video_condition"].to(self.device)

    def condition(self, canvases: torch.Tensor, masks: torch.Tensor, num_frames: int) -> torch.Tensor:
        """``[1, 20, 4 + T, h, w]``: reference slots then the video condition, in time."""
        self._check_references(canvases, masks)
        _check_frames(num_frames)
        video = self.video_condition(num_frames, int(canvases.shape[1]), int(canvases.shape[2]))
        return vae_condition(self.reference_slots(canvases, masks), video)

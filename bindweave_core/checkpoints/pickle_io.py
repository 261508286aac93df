"""Reading pickled PyTorch checkpoints (``.pt`` / ``.pth``) without unrestricted unpickling.

Some models ship only as ``torch.save`` files: Kaleido-14B-S2V's SAT/DeepSpeed
``mp_rank_00_model_states.pt`` and its bundled ``Wan2.1_VAE.pth`` and
``models_t5_umt5-xxl-enc-bf16.pth``. They are read with ``torch.load(weights_only=True, mmap=True)``:
the restricted unpickler builds tensors, containers and plain values only, and the tensor data stays
in the memory-mapped file until a loader converts it (the same lazy behaviour as safetensors).

DeepSpeed files also carry the RNG state of the training run as numpy arrays; the numpy array
reconstructors (and nothing else) are allowed for that. Anything else a file would need to
unpickle is refused with a clear error.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError

log = logging.getLogger("BindWeave")

PICKLE_SUFFIXES = (".pt", ".pth")
# Containers whose value is the state dict: DeepSpeed/SAT ("module"), Lightning-style ("state_dict").
_WRAPPER_KEYS = ("module", "state_dict", "model")


def is_pickle(path: Path) -> bool:
    return path.suffix.lower() in PICKLE_SUFFIXES


def _numpy_allowlist() -> list:
    """numpy's array reconstructors under both of their module names (numpy 1 pickles say ``numpy.core``)."""
    try:
        import numpy as np
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # pragma: no cover - numpy is a dependency of torch's users here
        return []
    plain = [type(np.dtype(c)) for c in ("b1", "u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8", "f2", "f4", "f8")]
    return [_reconstruct, (_reconstruct, "numpy.core.multiarray._reconstruct"), np.ndarray, np.dtype, *plain]


def _torch_load(file: Path, mmap: bool) -> Any:
    with torch.serialization.safe_globals(_numpy_allowlist()):
        return torch.load(str(file), map_location="cpu", weights_only=True, mmap=mmap)


def load_object(file: Path) -> Any:
    """``torch.load`` the file safely (restricted unpickler), memory-mapped when the format allows."""
    size = file.stat().st_size if file.exists() else 0
    try:
        try:
            return _torch_load(file, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            # Legacy (pre-zip) torch.save format: cannot be mapped, read it whole.
            log.info("%s uses the legacy torch.save format: reading it without memory mapping", file)
            return _torch_load(file, mmap=False)
    except pickle.UnpicklingError as e:
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(file))
        except Exception:  # noqa: BLE001 - only used to improve the message
            unsafe = []
        names = ", ".join(unsafe[:6]) or str(e).splitlines()[0]
        raise CheckpointError(
            f"{file}: this pickle needs Python objects that are not weights to load ({names}); it is not opened "
            "with unrestricted unpickling because that can run arbitrary code. Re-save just its tensors, in an "
            "environment you trust: torch.save(state_dict, 'weights.pt') or safetensors.torch.save_file(...).") from e
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"{file}: not a readable PyTorch checkpoint ({e}; {size:,} bytes). It is probably "
                              "truncated or not a model file: download it again.") from e


def state_dict_of(obj: Any, file: Path) -> dict[str, torch.Tensor]:
    """The ``{name: tensor}`` inside a loaded checkpoint (plain, or wrapped as DeepSpeed/SAT do)."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{file}: holds a {type(obj).__name__}, not a state dict of tensors.")
    for wrapper in _WRAPPER_KEYS:
        inner = obj.get(wrapper)
        if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            obj = inner
            break
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{file}: holds no tensors (keys: {', '.join(map(str, list(obj)[:6]))}).")
    return tensors


def read_state_dict(file: Path) -> dict[str, torch.Tensor]:
    return state_dict_of(load_object(file), file)


def iter_state_dict(file: Path, keys: list[str], release_bytes: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(key, tensor)``; the file is mapped again after every ``release_bytes`` so pages the caller
    has converted (and dropped) leave the process, as for safetensors."""
    start = 0
    while start < len(keys):
        tensors = read_state_dict(file)
        read = 0
        while start < len(keys) and (read == 0 or read < release_bytes):
            key = keys[start]
            if key not in tensors:
                raise CheckpointError(f"{file}: tensor {key} disappeared while loading; was the file replaced?")
            tensor = tensors[key]
            yield key, tensor
            read += tensor.numel() * tensor.element_size()
            start += 1
        del tensors

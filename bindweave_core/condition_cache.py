"""Conditions that depend only on their inputs, kept between runs: in memory, optionally on disk.

What is kept (each entry is a small dict of CPU tensors, exactly as the encoder returned them):

* ``video``: the VAE latent of the all-zero video (spec section 8), per (VAE, frames, height, width,
  dtype, device, tiling). At 81 frames and 720p it is the costliest encode of a run and never changes;
* ``text``: UMT5 states of (prompt, negative prompt);
* ``planner``: planner states of (prompt, negative prompt, images);
* ``references``: the whole reference condition of (letterboxed canvases, masks, size, frames).

Keys are sha256 hashes of JSON of the inputs and of the *model identity*:

* a model loaded from a file or folder: the resolved path(s), sizes and modification times (ns) of its
  files, plus the dtypes its parameters are stored in (fp8 storage gives other numbers) and, for the text
  encoder, its tokenizer and prompt options -- stable
  across processes and cheap (no hashing of gigabytes), so these entries may go to disk;
* a model built in memory (the smoke models, a model handed over by a host): ``id()`` of the module
  plus a fingerprint of every parameter (name, shape, dtype and 64 evenly spaced elements) -- only valid
  in this process, so such entries stay in memory.

Entries are exact: the tensors stored are the encoder's output, bit for bit (disk: safetensors keeps
dtype and bits). Disk files are ``<kind>-<key>.safetensors`` in the cache directory, written to a
temporary name and renamed; a file whose stored key does not match is ignored. Each file carries the
sha256 of its tensors (:func:`content_digest`, in the metadata): a file whose bytes were damaged (a
flipped bit keeps the size) fails that check and is recomputed and rewritten, with one warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .checkpoints.in_memory import is_in_memory

log = logging.getLogger("BindWeave")

VERSION = 2  # bump when what an entry holds changes
MAX_ENTRIES = 32
MAX_BYTES = 4 << 30  # in-memory budget (an 81-frame 720p video condition is 24 MB, text states 16 MB)
_SAMPLES = 64  # elements per parameter in an in-memory fingerprint

Tensors = dict[str, torch.Tensor]


def digest(obj: Any) -> str:
    """sha256 of an object's JSON (keys sorted, anything else by ``str``): the one hash of identities."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's shape, dtype and bytes (for inputs such as letterboxed canvases)."""
    h = hashlib.sha256(f"{list(t.shape)}:{t.dtype}:".encode())
    flat = t.detach().cpu().contiguous().reshape(-1)
    h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return h.hexdigest()


def content_digest(tensors: Tensors) -> str:
    """sha256 over every tensor of an entry (names, shapes, dtypes and bytes): the checksum a disk entry keeps."""
    return digest({name: tensor_digest(t) for name, t in sorted(tensors.items())})


def file_identity(path: str | os.PathLike) -> list[Any]:
    """``[resolved path, size, mtime_ns]``: a file as the caches name it (a change of any part is a new file);
    a host's loaded model (an in-memory pseudo path, unique per model) is ``[pseudo path]``."""
    if is_in_memory(path):
        return [str(path)]
    st = os.stat(path)
    return [str(Path(path).resolve()), st.st_size, st.st_mtime_ns]


def path_identity(path: str | os.PathLike) -> list[list[Any]]:
    """:func:`file_identity` of a file, or of every file under a folder (sorted), as a list."""
    p = Path(path)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    return [file_identity(f) for f in files]


def _module(component: Any) -> torch.nn.Module | None:
    if isinstance(component, torch.nn.Module):
        return component
    m = getattr(component, "model", None)
    return m if isinstance(m, torch.nn.Module) else None


def _storage_dtypes(module: torch.nn.Module | None) -> list[str]:
    return sorted({str(p.dtype) for p in module.parameters()}) if module is not None else []


def weights_fingerprint(module: torch.nn.Module) -> str:
    """Names, shapes, dtypes and 64 evenly spaced elements of every parameter and buffer (cheap, not a
    full hash: it tells models apart, it does not prove two are equal)."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            h.update(f"{name}:{list(t.shape)}:{t.dtype};".encode())
            flat = t.detach().reshape(-1)
            if flat.numel() == 0 or flat.device.type == "meta":
                continue
            step = max(1, flat.numel() // _SAMPLES)
            sample = flat[::step][:_SAMPLES].contiguous().cpu()
            h.update(sample.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_identity(component: Any) -> tuple[str, bool]:
    """``(identity, persistent)`` of a loaded model (see the module docstring); ``persistent`` says
    whether entries keyed by it may be written to disk."""
    module = _module(component)
    own = getattr(component, "identity", None)  # the planner carries one (files + tokenizer + settings)
    if isinstance(own, str) and own:
        return digest({"identity": own, "dtypes": _storage_dtypes(module)}), True
    info = getattr(component, "checkpoint_info", None) or getattr(module, "checkpoint_info", None)
    source = getattr(info, "path", None) or getattr(component, "source", None)
    if source and Path(str(source)).exists():
        tokenizer = getattr(component, "tokenizer", None)  # the text encoder: the tokenizer changes the ids
        extra = {"class": type(component).__name__, "dtypes": _storage_dtypes(module),
                 "tokenizer": [type(tokenizer).__name__, getattr(tokenizer, "name_or_path", None),
                               getattr(tokenizer, "vocab_size", None)] if tokenizer is not None else None,
                 "options": {k: getattr(component, k, None) for k in ("text_len", "clean_prompts")}}
        return digest({"files": path_identity(source), **extra}), True
    if module is None:
        return f"object:{id(component)}", False
    return f"memory:{id(module)}:{weights_fingerprint(module)}", False


class ConditionCache:
    """An LRU of condition tensors in memory, backed by ``directory`` when one is given."""

    def __init__(self, directory: str | os.PathLike | None = None, *, max_entries: int = MAX_ENTRIES,
                 max_bytes: int = MAX_BYTES) -> None:
        self.directory = Path(directory) if directory else None
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._memory: OrderedDict[str, Tensors] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def key(self, kind: str, parts: dict[str, Any]) -> str:
        return digest({"v": VERSION, "kind": kind, **parts})

    def path(self, kind: str, key: str) -> Path | None:
        return self.directory / f"{kind}-{key[:40]}.safetensors" if self.directory else None

    def get(self, kind: str, parts: dict[str, Any], compute: Callable[[], Tensors], *,
            persistent: bool = True) -> Tensors:
        """The entry for ``parts`` (memory, then disk), else ``compute()`` stored. Tensors come back on
        the CPU; callers own them (they are copies of what is kept)."""
        key = self.key(kind, parts)
        found = self._memory.get(key)
        if found is None and persistent:
            found = self._load(kind, key)
            if found is not None:
                self._remember(key, found)
        if found is not None:
            self._memory.move_to_end(key)
            self.hits += 1
            log.info("%s condition reused from the cache", kind)
            return {k: v.clone() for k, v in found.items()}
        self.misses += 1
        fresh = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in compute().items()}
        self._remember(key, fresh)
        if persistent and self.directory is not None:
            self._store(kind, key, fresh)
        return {k: v.clone() for k, v in fresh.items()}

    def clear(self) -> None:
        self._memory.clear()

    def __len__(self) -> int:
        return len(self._memory)

    # ------------------------------------------------------------------------------ internals
    def _remember(self, key: str, tensors: Tensors) -> None:
        self._memory[key] = tensors
        self._memory.move_to_end(key)

        def size() -> int:
            return sum(t.numel() * t.element_size() for e in self._memory.values() for t in e.values())

        while len(self._memory) > 1 and (len(self._memory) > self.max_entries or size() > self.max_bytes):
            self._memory.popitem(last=False)

    def _load(self, kind: str, key: str) -> Tensors | None:
        from safetensors import SafetensorError, safe_open

        p = self.path(kind, key)
        if p is None or not p.exists():
            return None
        try:
            with safe_open(str(p), framework="pt") as f:
                metadata = f.metadata() or {}
                if metadata.get("key") != key:
                    return None
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except (SafetensorError, OSError, KeyError, ValueError, RuntimeError) as e:
            log.warning("condition cache file %s is unreadable (%s); computing the entry again", p, e)
            return None
        if metadata.get("sha256") != content_digest(tensors):
            log.warning("condition cache file %s is damaged (its content does not match its checksum); computing "
                        "the entry again and rewriting the file", p)
            return None
        return tensors

    def _store(self, kind: str, key: str, tensors: Tensors) -> None:
        from .checkpoints.writers import atomic_save_file

        try:
            atomic_save_file(tensors, self.path(kind, key), metadata={"key": key, "kind": kind,
                                                                       "sha256": content_digest(tensors)})
        except OSError as e:  # a full or read-only cache folder must not fail the generation
            log.warning("could not write the condition cache file %s (%s)", self.path(kind, key), e)


_SHARED = ConditionCache()


def shared_cache() -> ConditionCache:
    """The process-wide in-memory cache (the ComfyUI nodes and pipelines without their own use it)."""
    return _SHARED

"""The feature cache: planner, UMT5, CLIP and VAE run once per sample; training reads safetensors.

``python -m training.train_lora --config C --cache-only`` fills it; a training run fills whatever is
missing first. Files (under ``cache.dir``, default ``<output_dir>/cache``):

* ``samples/<key>.safetensors``: one per sample: ``latents`` (the clip's normalised VAE latents,
  float32 ``[1, 16, T, h, w]``), ``text`` (UMT5 ``[1, 512, D]``) and per reference variant ``k``
  (see :mod:`training.augment`) ``v{k}.planner`` (Qwen states, when a planner is configured),
  ``v{k}.clip`` (``[1, 1028, 1280]``) and ``v{k}.slots`` (``[1, 20, 4, h, w]``); for R-RoPE
  (Kaleido) DiTs ``v{k}.ref_latents`` (``[1, n, 16, h, w]``) instead of planner, CLIP and slots;
* ``video_condition/<key>.safetensors``: the all-zero video's condition, one per bucket and frame count;
* ``validation/<key>.safetensors``: the preview prompt's positive and negative branches;
* ``failures/<key>.json``: why a sample could not be encoded (retried on the next run).

``<key>`` hashes everything the features depend on: the sample's files (size + mtime, or their
content with ``cache.hash_contents``), its prompt, the bucket, frame count and fps, the mask mode,
the augmentation settings, the conditioning mode and the encoders' identities (their files, or
their weights for in-memory models) and dtype. A changed sample or model therefore gets a new entry; stale entries
are never read (delete the folder to reclaim the space). Writes are atomic.

With several processes each encodes its share of the missing samples.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from bindweave_core.checkpoints.writers import atomic_save_file
from bindweave_core.condition_cache import digest, file_identity
from bindweave_core.errors import BindWeaveError
from bindweave_core.families import family_for
from bindweave_core.pipeline import BindWeavePipeline, GenerationSettings
from bindweave_core.references import load_image

from .augment import augment_reference, variant_rng
from .config import TrainConfig
from .dataset import BadSample, Sample, load_clip, load_references
from .model import build_encoders, dit_config, encoder_identities
from .objective import conditioning_mode

log = logging.getLogger("BindWeave")

CACHE_VERSION = 2  # bump when what is stored (or how it is computed) changes


def sample_file_identity(path: Path, contents: bool = False) -> Any:
    """The sha256 of a sample file's bytes (``cache.hash_contents``), else the core's :func:`file_identity`."""
    if contents:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    return file_identity(path)


@dataclass
class CacheResult:
    entries: dict[str, Path] = field(default_factory=dict)  # sample name -> entry file
    bad: list[BadSample] = field(default_factory=list)
    video_conditions: dict[tuple[int, int, int], Path] = field(default_factory=dict)  # (w, h, frames) -> file
    validation: Path | None = None
    encoded: int = 0  # entries written by this process


class FeatureCache:
    """Keys, paths and the encoding pass of one training config."""

    def __init__(self, cfg: TrainConfig, encoders: dict[str, Any] | None = None, progress: bool = False):
        self.cfg = cfg
        self.progress = progress  # progress bars (the main process of a run)
        self._bar = tqdm(disable=True)
        self.dir = cfg.cache_dir
        self.encoders = encoders if encoders is not None else build_encoders(cfg)
        self.model_ids = encoder_identities(cfg, self.encoders)
        self.family = dit_config(cfg).family
        self.model_family = family_for(self.family)  # what its references need (encoders, video condition)
        self.mode = conditioning_mode(cfg.objective.conditioning, dit_config(cfg))  # slots | rrope

    # ------------------------------------------------------------------ keys
    def _settings(self) -> dict[str, Any]:
        a, d = self.cfg.augment, self.cfg.data
        aug = {"variants": a.variants} if a.variants == 1 else {
            "variants": a.variants, "rotation": a.rotation, "scale": list(a.scale), "seed": a.seed}
        return {"v": CACHE_VERSION, "models": self.model_ids, "dtype": self.cfg.model.dtype, "mode": self.mode,
                "num_frames": d.num_frames, "fps": d.fps, "augment": aug}

    def sample_key(self, s: Sample) -> str:
        files = [sample_file_identity(p, self.cfg.cache.hash_contents) for p in s.files()]
        masks = [r.mask is not None for r in s.references]
        return digest({**self._settings(), "files": files, "masks": masks, "prompt": s.prompt,
                      "mask_mode": s.mask_mode or self.cfg.data.mask_mode, "bucket": list(s.bucket),
                      "frames": s.num_frames, "start": s.start})

    def video_condition_key(self, group: tuple[int, int, int]) -> str:
        return digest({"v": CACHE_VERSION, "vae": self.model_ids["vae"], "dtype": self.cfg.model.dtype,
                      "group": list(group)})

    def path(self, kind: str, key: str, suffix: str = ".safetensors") -> Path:
        return self.dir / kind / f"{key[:40]}{suffix}"

    @staticmethod
    def _valid(path: Path, key: str) -> bool:
        from safetensors import SafetensorError, safe_open

        if not path.exists():
            return False
        try:
            with safe_open(str(path), framework="pt") as f:
                return (f.metadata() or {}).get("key") == key
        except (SafetensorError, OSError):
            return False

    # ------------------------------------------------------------------ the pass
    def ensure(self, samples: list[Sample], device: torch.device | str = "cpu", rank: int = 0, world: int = 1,
               validation: dict[str, Any] | None = None) -> CacheResult:
        """Encode what is missing (this process's share), return what exists now for every sample.

        Call :meth:`collect` after all processes are done to see the other processes' work.
        """
        keys = {s.name: self.sample_key(s) for s in samples}
        # Shares come from the sample list, not from what is missing: another process may be writing already.
        mine = [s for i, s in enumerate(samples) if i % world == rank
                and not self._valid(self.path("samples", keys[s.name]), keys[s.name])]
        groups = sorted({s.group for s in samples}) if self.model_family.needs_video_condition else []
        todo_vc = [b for b in groups if rank == 0 and not self._valid(
            self.path("video_condition", self.video_condition_key(b)), self.video_condition_key(b))]
        val_key = self.validation_key(validation) if validation else None
        todo_val = rank == 0 and val_key is not None and not self._valid(self.path("validation", val_key), val_key)
        result = CacheResult()
        if mine or todo_vc or todo_val:
            log.info("feature cache: encoding %d of %d samples in %s", len(mine), len(samples), self.dir)
            pipe = BindWeavePipeline(dit=None, **self.encoders, device=device, offload=self.cfg.cache.offload)
            size = max(1, self.cfg.cache.chunk_size)
            stages = 2 + sum(self._uses(n) for n in ("planner", "clip_vision"))
            self._bar = tqdm(total=len(mine) * stages, desc="feature cache",
                             unit="encoding", disable=not self.progress or not mine, dynamic_ncols=True)
            try:
                for start in range(0, len(mine), size):
                    chunk = mine[start:start + size]
                    result.encoded += self._encode_chunk(pipe, chunk, keys)
            finally:
                self._bar.close()
            if todo_vc:
                with pipe.on_device("vae") as vae:
                    for b in todo_vc:
                        vc = vae.video_condition(b[2], b[1], b[0]).cpu()
                        key = self.video_condition_key(b)
                        atomic_save_file({"condition": vc}, self.path("video_condition", key), metadata={"key": key})
            if todo_val:
                self._encode_validation(pipe, validation, val_key)
            del pipe
        collected = self.collect(samples, validation)
        collected.encoded = result.encoded
        return collected

    def collect(self, samples: list[Sample], validation: dict[str, Any] | None = None) -> CacheResult:
        """What the cache holds for ``samples``; those without an entry come back as bad samples."""
        result = CacheResult()
        for s in samples:
            key = self.sample_key(s)
            path = self.path("samples", key)
            if self._valid(path, key):
                result.entries[s.name] = path
            else:
                failure = self.path("failures", key, ".json")
                reason = (json.loads(failure.read_text())["reason"] if failure.exists()
                          else "not in the feature cache (its encoding failed in another process)")
                result.bad.append(BadSample(str(s.video), reason))
        for g in sorted({s.group for s in samples}) if self.model_family.needs_video_condition else []:
            result.video_conditions[g] = self.path("video_condition", self.video_condition_key(g))
        if validation:
            result.validation = self.path("validation", self.validation_key(validation))
        return result

    def _fail(self, s: Sample, key: str, error: Exception) -> None:
        log.warning("%s: cannot be encoded, left out: %s", s.name, error)
        path = self.path("failures", key, ".json")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"sample": s.name, "reason": str(error)}))
        os.replace(tmp, path)

    def _encode_chunk(self, pipe: BindWeavePipeline, chunk: list[Sample], keys: dict[str, str]) -> int:
        """Each encoder once over the whole chunk (so only one is in memory at a time)."""
        cfg = self.cfg
        items: list[dict[str, Any]] = []
        for s in chunk:
            failure = self.path("failures", keys[s.name], ".json")
            if failure.exists():
                failure.unlink()
            try:
                items.append({"sample": s, "variants": self._variants(s, keys[s.name]),
                              "mask_mode": s.mask_mode or cfg.data.mask_mode})
            except BindWeaveError as e:
                self._fail(s, keys[s.name], e)

        def each(stage: str, fn) -> None:
            self._bar.set_postfix_str(stage)
            for item in list(items):
                try:
                    fn(item)
                except BindWeaveError as e:
                    self._fail(item["sample"], keys[item["sample"].name], e)
                    items.remove(item)
                self._bar.update(1)
            log.debug("cache: %s done for %d samples", stage, len(items))

        if self._uses("planner"):  # Kaleido conditions on UMT5 and clean reference latents only
            with pipe.on_device("planner") as planner:
                each("planner", lambda it: [v.update(planner=planner.hidden_states(it["sample"].prompt, v["images"]).cpu())
                                            for v in it["variants"]])
        with pipe.on_device("text_encoder") as text:
            each("text", lambda it: it.update(text=text.encode([it["sample"].prompt]).cpu()))
        if self._uses("clip_vision"):
            with pipe.on_device("clip_vision") as clip:
                each("clip", lambda it: [v.update(clip=clip.encode_references(v["canvases"]).cpu())
                                         for v in it["variants"]])
        written = 0
        with pipe.on_device("vae") as vae:
            def encode_vae(it: dict[str, Any]) -> None:
                s = it["sample"]
                video = load_clip(s, s.num_frames, cfg.data.fps, s.bucket)
                it["latents"] = vae.encode(video).cpu()
                for v in it["variants"]:
                    v.update(self.model_family.cache_reference_tensors(vae, v, s.bucket, it["mask_mode"]))
            each("vae", encode_vae)
        for it in items:
            self._write(it, keys[it["sample"].name])
            written += 1
        return written

    def _variants(self, s: Sample, key: str) -> list[dict[str, Any]]:
        """Variant 0: the references as they are; 1..K-1: augmented (see training.augment)."""
        a = self.cfg.augment
        family = self.model_family
        images, masks = load_references(s)
        mode = s.mask_mode or self.cfg.data.mask_mode
        out = []
        for k in range(a.variants):
            imgs, msks = images, masks
            if k:
                rng = variant_rng(a.seed, key, k)
                pairs = [augment_reference(im, m, s.bucket, rng, a.rotation, tuple(a.scale),
                                           background=family.canvas_colour,
                                           letterbox_upscales=family.letterbox_upscales) for im, m in zip(images, masks)]
                imgs, msks = [p[0] for p in pairs], [p[1] for p in pairs]
            out.append(family.cache_variant(imgs, msks, s.bucket, mode))
        return out

    def _uses(self, encoder: str) -> bool:
        """Whether the cache runs ``encoder``: the DiT's family needs it and one was given (the planner is
        optional)."""
        return encoder in self.model_family.encoders and self.encoders.get(encoder) is not None

    def _write(self, item: dict[str, Any], key: str) -> None:
        s = item["sample"]
        tensors = {"latents": item["latents"], "text": item["text"]}
        for k, v in enumerate(item["variants"]):
            for name in ("planner", "clip", "slots", "ref_latents"):
                if name in v:
                    tensors[f"v{k}.{name}"] = v[name]
        meta = {"key": key, "sample": s.name, "prompt": s.prompt, "references": str(len(s.references)),
                "variants": str(len(item["variants"])), "bucket": f"{s.bucket[0]}x{s.bucket[1]}"}
        atomic_save_file(tensors, self.path("samples", key), metadata=meta)

    # ------------------------------------------------------------------ validation conditioning
    def validation_key(self, v: dict[str, Any]) -> str:
        files = [sample_file_identity(Path(p), self.cfg.cache.hash_contents) for p in v["references"]]
        return digest({**self._settings(), "validation": {k: val for k, val in v.items() if k != "references"},
                      "files": files})

    def _encode_validation(self, pipe: BindWeavePipeline, v: dict[str, Any], key: str) -> None:
        settings = GenerationSettings(prompt=v["prompt"], width=v["width"], height=v["height"],
                                      num_frames=v["num_frames"], mask_mode=v["mask_mode"],
                                      negative_prompt=self.model_family.defaults()["negative_prompt"])
        images = [load_image(p) for p in v["references"]]
        planner = None
        if self._uses("planner"):
            planner = pipe.encode_planner(v["prompt"], images, settings.planner_negative_prompt)
        text = pipe.encode_text(v["prompt"], settings.negative_prompt)
        refs = pipe.encode_references(images, settings, family=self.family)
        # Stored as the training items are, so the same conditioning builder makes its DiT inputs.
        tensors = {"cond.text": text.positive, "uncond.text": text.negative}
        optional = {"slots": refs.slots, "ref_latents": refs.latents, "clip": refs.clip_tokens,
                    "video_condition": refs.video_condition,
                    "cond.planner": planner.positive if planner else None,
                    "uncond.planner": planner.negative if planner else None}
        tensors.update({k: t for k, t in optional.items() if t is not None})
        atomic_save_file({k: t.detach().cpu().clone() for k, t in tensors.items()}, self.path("validation", key),
                         metadata={"key": key, "prompt": v["prompt"], "references": str(len(images))})


# ------------------------------------------------------------------------------------------ reading
def load_entry(path: Path, variant: int) -> dict[str, Any]:
    """One cached sample with the tensors of reference variant ``variant``."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
        meta = f.metadata() or {}
        out: dict[str, Any] = {"latents": f.get_tensor("latents"), "text": f.get_tensor("text"),
                               "num_references": int(meta.get("references", 1))}
        for name in ("planner", "clip", "slots", "ref_latents"):
            if f"v{variant}.{name}" in names:
                out[name] = f.get_tensor(f"v{variant}.{name}")
    return out


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))

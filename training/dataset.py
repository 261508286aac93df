"""Training samples: finding them, checking every one up front, frames and resolution buckets.

A sample is a video (or an image: a 1-frame clip), 1-4 reference images (each optionally with a
mask; RGBA cut-outs work with ``mask_mode: alpha``) and a prompt. Three layouts:

* a JSONL file (or a folder holding ``samples.jsonl``), one sample per line, paths relative to
  the file::

      {"video": "clips/a.mp4", "prompt": "a man walks his dog",
       "references": ["refs/man.png", {"image": "refs/dog.png", "mask": "refs/dog_mask.png"}],
       "mask_mode": "alpha"}            # optional, overrides data.mask_mode

* a folder of sample folders, each with one video file, ``prompt.txt`` and reference images whose
  names start with ``ref`` (``ref1.png``, ``ref2.jpg``, ...; taken in name order); the mask of
  ``ref1.png`` is ``ref1_mask.png``;

* a flat folder of videos and/or images, each with a same-name ``.txt`` caption and its references
  beside it as ``<name>_ref1.png``, ``<name>_ref2.png`` (masks ``<name>_ref1_mask.png``)::

      clip1.mp4  clip1.txt  clip1_ref1.png   photo.jpg  photo.txt  photo_ref1.png

  (a folder may mix sample folders and flat samples).

Every sample is checked before training (files present and decodable, enough frames at the target
fps, 1-4 references, masks of the right size, a prompt, a bucket no larger than the clip); the bad
ones are reported by path and reason and left out. Frames are sampled at ``data.fps`` (nearest
source frame); each clip takes the longest of ``data.num_frames`` it can supply (frame buckets) and
``data.frame_sampling`` picks where: ``head`` (from the start), ``uniform`` (``frame_windows``
windows spread over the clip) or ``chunk`` (every whole window, one after another). Each clip goes
to the bucket of the nearest aspect ratio among those it covers (never upscaled unless
``data.upscale``), is resized to cover it, then centre-cropped.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from bindweave_core import constants as C
from bindweave_core.errors import InputError
from bindweave_core.images import load_rgb
from bindweave_core.references import load_image, placement_for

log = logging.getLogger("BindWeave")

VIDEO_EXTENSIONS = (".mp4", ".mov", ".webm", ".mkv", ".avi", ".m4v")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
JSONL_NAMES = ("samples.jsonl", "metadata.jsonl", "train.jsonl")


@dataclass(frozen=True)
class Reference:
    image: Path
    mask: Path | None = None


@dataclass
class Sample:
    name: str  # where the sample is defined (folder, or file:line), for reports
    video: Path
    references: list[Reference]
    prompt: str
    mask_mode: str | None = None  # None: data.mask_mode
    repeats: int = 1  # how often the sample counts per epoch (its dataset's repeats)
    # filled in by validation
    source_frames: int = 0
    source_fps: float = 0.0
    width: int = 0
    height: int = 0
    bucket: tuple[int, int] = (0, 0)
    num_frames: int = 0  # frames of the training clip (its frame bucket)
    start: int = 0  # first source frame of the clip's window

    @property
    def is_image(self) -> bool:
        return self.video.suffix.lower() in IMAGE_EXTENSIONS

    @property
    def group(self) -> tuple[int, int, int]:
        """What a batch must share: ``(width, height, frames)``."""
        return (*self.bucket, self.num_frames)

    def files(self) -> list[Path]:
        out = [self.video]
        for r in self.references:
            out.append(r.image)
            if r.mask is not None:
                out.append(r.mask)
        return out


@dataclass
class BadSample:
    path: str  # the file (or sample) at fault
    reason: str


@dataclass
class DatasetReport:
    good: list[Sample] = field(default_factory=list)
    bad: list[BadSample] = field(default_factory=list)

    def log(self) -> None:
        if self.bad:
            log.warning("%d of %d samples are left out:\n%s", len(self.bad), len(self.good) + len(self.bad),
                        "\n".join(f"  {b.path}: {b.reason}" for b in self.bad))
        log.info("%d usable training samples", len(self.good))

    def write(self, path: Path) -> None:
        from bindweave_core.video_io import write_json

        write_json({"good": [s.name for s in self.good], "bad": [asdict(b) for b in self.bad]}, path)


# ------------------------------------------------------------------------------------------ discovery
def discover(path: str | Path) -> tuple[list[Sample], list[BadSample]]:
    """Read the sample list (JSONL or folders); malformed entries come back as bad samples."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"data.path {path} does not exist.")
    if path.is_dir():
        jsonl = next((path / n for n in JSONL_NAMES if (path / n).is_file()), None)
        return _from_jsonl(jsonl) if jsonl else _from_folders(path)
    return _from_jsonl(path)


def _reference(entry: Any, base: Path) -> Reference:
    if isinstance(entry, str):
        return Reference(base / entry)
    if isinstance(entry, dict) and isinstance(entry.get("image"), str):
        mask = entry.get("mask")
        return Reference(base / entry["image"], base / mask if isinstance(mask, str) else None)
    raise ValueError(f"a reference must be a path or {{'image': path, 'mask': path}}, got {entry!r}")


def read_caption(path: Path) -> tuple[str, str | None]:
    """``(caption, None)``, or ``("", reason)`` for a caption file that is not UTF-8 text: that sample is
    reported and left out, as a bad video is (one stray Latin-1 file must not stop the whole run)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig").strip(), None
    except UnicodeDecodeError as e:
        return "", (f"caption file {path.name} is not UTF-8 text (byte {e.start} is 0x{data[e.start]:02x}); save it "
                    "as UTF-8")


def _from_jsonl(path: Path) -> tuple[list[Sample], list[BadSample]]:
    samples, bad = [], []
    base = path.parent
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:  # the whole list of samples: nothing to train on without it
        raise InputError(f"{path} is not UTF-8 text (byte {e.start} is 0x{data[e.start]:02x}): save it as UTF-8.") \
            from None
    for i, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}:{i}"
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict):
                raise ValueError("each line must be a JSON object")
            video = entry.get("video", entry.get("image"))  # an image: a 1-frame clip
            if not isinstance(video, str):
                raise ValueError("no 'video' (or 'image') path")
            refs = entry.get("references", entry.get("refs"))
            if isinstance(refs, (str, dict)):
                refs = [refs]
            if not isinstance(refs, list):
                raise ValueError("no 'references' list")
            prompt = entry.get("prompt", entry.get("caption"))
            samples.append(Sample(where, base / video, [_reference(r, base) for r in refs],
                                  prompt if isinstance(prompt, str) else "", entry.get("mask_mode")))
        except ValueError as e:
            bad.append(BadSample(where, f"malformed line: {e}"))
    return samples, bad


def _from_flat(root: Path) -> tuple[list[Sample], list[BadSample]]:
    """Videos / images with a same-name ``.txt`` caption, references ``<name>_ref*.png`` beside them."""
    files = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    images = {p.stem: p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS}
    samples, bad = [], []
    for media in files:
        if media.suffix.lower() not in VIDEO_EXTENSIONS + IMAGE_EXTENSIONS:
            continue
        caption = media.with_suffix(".txt")
        if not caption.is_file():
            if media.suffix.lower() in VIDEO_EXTENSIONS:
                bad.append(BadSample(str(media), f"no caption file {caption.name}"))
            continue  # an image without a caption is a reference or a mask
        prefix = media.stem + "_ref"
        refs = [Reference(p, images.get(stem + "_mask")) for stem, p in sorted(images.items())
                if stem.startswith(prefix) and not stem.endswith("_mask")]
        prompt, reason = read_caption(caption)
        if reason:
            bad.append(BadSample(str(media), reason))
            continue
        samples.append(Sample(str(media), media, refs, prompt))
    return samples, bad


def _from_folders(root: Path) -> tuple[list[Sample], list[BadSample]]:
    samples, bad = _from_flat(root)
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders and not samples and not bad:
        raise InputError(f"{root} holds no sample folders, no captioned videos/images (<name>.mp4 + <name>.txt) "
                         f"and no {' / '.join(JSONL_NAMES)}; see the training section of the README for the layouts.")
    for folder in folders:
        files = sorted(p for p in folder.iterdir() if p.is_file())
        videos = [p for p in files if p.suffix.lower() in VIDEO_EXTENSIONS]
        if len(videos) != 1:
            bad.append(BadSample(str(folder), f"expected one video file ({', '.join(VIDEO_EXTENSIONS)}), found "
                                              f"{len(videos)}"))
            continue
        images = {p.stem: p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS}
        refs = [Reference(p, images.get(stem + "_mask")) for stem, p in sorted(images.items())
                if stem.lower().startswith("ref") and not stem.endswith("_mask")]
        prompt_file = folder / "prompt.txt"
        prompt, reason = read_caption(prompt_file) if prompt_file.is_file() else ("", None)
        if reason:
            bad.append(BadSample(str(folder), reason))
            continue
        samples.append(Sample(str(folder), videos[0], refs, prompt))
    return samples, bad


# ------------------------------------------------------------------------------------------ checks
def probe_video(path: Path) -> tuple[int, float, int, int]:
    """``(frames, fps, width, height)`` from the container; decodes the first frame to prove it can."""
    import av

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            first = next(container.decode(stream))
            width, height, frames = first.width, first.height, int(stream.frames or 0)
        if frames <= 0:  # some containers do not store the count: count packets (no decoding)
            with av.open(str(path)) as container:
                stream = container.streams.video[0]
                frames = sum(1 for p in container.demux(stream) if p.size)
    except StopIteration:
        raise InputError("the video has no frames") from None
    except (av.error.FFmpegError, IndexError, OSError) as e:
        raise InputError(f"cannot read this video ({e})") from e
    return frames, fps, width, height


def frame_indices(available: int, source_fps: float, num_frames: int, fps: float, start: int = 0) -> list[int] | None:
    """Source frame of each of ``num_frames`` frames sampled at ``fps`` from source frame ``start``
    (nearest frame); None when the video is too short. An unknown source rate is taken as ``fps``."""
    step = source_fps / fps if source_fps > 0 else 1.0
    idx = [start + int(math.floor(i * step + 0.5)) for i in range(num_frames)]
    return idx if idx[-1] < available else None


def window_starts(available: int, source_fps: float, num_frames: int, fps: float, sampling: str = "head",
                  windows: int = 1) -> list[int]:
    """First source frame of each training window of a clip (empty when even one does not fit).

    ``head``: one window from the start; ``uniform``: ``windows`` windows with evenly spread starts
    (fewer when the clip is too short to give them distinct starts); ``chunk``: consecutive windows
    without overlap, as many as fit.
    """
    idx = frame_indices(available, source_fps, num_frames, fps)
    if idx is None:
        return []
    slack = available - 1 - idx[-1]  # how far the window can move
    if sampling == "head" or slack == 0:
        return [0]
    if sampling == "uniform":
        n = min(windows, slack + 1)
        return [0] if n == 1 else sorted({round(k * slack / (n - 1)) for k in range(n)})
    if sampling == "chunk":
        step = source_fps / fps if source_fps > 0 else 1.0
        length = max(1, int(math.floor(num_frames * step + 0.5)))  # source frames one window spans
        return list(range(0, slack + 1, length))
    raise ValueError(f"frame sampling must be head, uniform or chunk, got {sampling!r}")


def choose_frames(available: int, source_fps: float, counts: list[int], fps: float) -> int | None:
    """The longest frame count of ``counts`` the clip can supply at ``fps`` (None: not even the shortest)."""
    fitting = [n for n in counts if frame_indices(available, source_fps, n, fps) is not None]
    return max(fitting) if fitting else None


def choose_bucket(width: int, height: int, buckets: list[list[int]] | list[tuple[int, int]],
                  upscale: bool = True) -> tuple[int, int] | None:
    """The bucket whose aspect ratio is nearest (in log scale) to ``width / height`` (ties: the larger).

    ``upscale=False`` considers only the buckets the clip covers (no side larger than the clip's):
    None when there is none.
    """
    if not upscale:
        buckets = [b for b in buckets if b[0] <= width and b[1] <= height]
        if not buckets:
            return None
    ratio = math.log(width / height)
    best = min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))
    return int(best[0]), int(best[1])


def _strip(path: Path, message: str) -> str:
    prefix = f"{path}: "
    return message[len(prefix):] if message.startswith(prefix) else message


def _check_sample(s: Sample, num_frames: list[int], fps: float, buckets: list[list[int]],
                  mask_mode: str, upscale: bool = False) -> BadSample | None:
    """Fills the probe fields of ``s``; returns its first problem (the file at fault and why)."""
    if not s.prompt.strip():
        return BadSample(s.name, "no prompt (empty or missing prompt.txt / 'prompt')")
    if not 1 <= len(s.references) <= C.MAX_REFERENCES:
        hint = ""
        if not s.references:  # where this layout looks for them
            hint = (f" (none found: put them beside it as {s.video.stem}_ref1.png, {s.video.stem}_ref2.png, ...)"
                    if s.name == str(s.video) else " (none found: ref1.png, ref2.png, ... in the sample folder, or "
                    "'references' in the JSONL line)")
        return BadSample(s.name, f"{len(s.references)} reference images; a sample takes 1 to {C.MAX_REFERENCES}{hint}")
    if s.mask_mode not in (None, *C.MASK_MODES):
        return BadSample(s.name, f"mask_mode must be rectangle or alpha, got {s.mask_mode!r}")
    video = str(s.video)
    if not s.video.is_file():
        return BadSample(video, "image file not found" if s.is_image else "video file not found")
    if s.is_image:  # an image sample is a 1-frame clip
        try:
            s.width, s.height = load_image(s.video).size
        except InputError as e:
            return BadSample(video, _strip(s.video, str(e)))
        s.source_frames, s.source_fps, s.num_frames = 1, 0.0, 1
    else:
        try:
            s.source_frames, s.source_fps, s.width, s.height = probe_video(s.video)
        except InputError as e:
            return BadSample(video, str(e))
        chosen = choose_frames(s.source_frames, s.source_fps, num_frames, fps)
        if chosen is None:
            shortest = min(num_frames)
            need = (shortest - 1) / fps
            have = s.source_frames / s.source_fps if s.source_fps else s.source_frames / fps
            return BadSample(video, f"too few frames: {s.source_frames} at {s.source_fps:g} fps ({have:.2f} s); "
                                    f"{shortest} frames at {fps:g} fps need {need:.2f} s (add a shorter count to "
                                    "data.num_frames, e.g. 17, or lower data.fps)")
        s.num_frames = chosen
    bucket = choose_bucket(s.width, s.height, buckets, upscale)
    if bucket is None:
        return BadSample(video, f"{s.width}x{s.height} is smaller than every bucket "
                                f"({', '.join(f'{w}x{h}' for w, h in buckets)}); add a bucket no larger than the "
                                "clip to data.buckets, or set data.upscale: true to upscale it")
    s.bucket = bucket
    for ref in s.references:
        try:
            image = load_image(ref.image)
        except InputError as e:
            reason = "missing reference image" if not ref.image.exists() else _strip(ref.image, str(e))
            return BadSample(str(ref.image), reason)
        try:
            placement_for(image.size, *s.bucket)
        except InputError as e:
            return BadSample(str(ref.image), str(e))
        if ref.mask is not None:
            try:
                mask = load_image(ref.mask)
            except InputError as e:
                reason = "mask file not found" if not ref.mask.exists() else _strip(ref.mask, str(e))
                return BadSample(str(ref.mask), f"bad mask: {reason}")
            if mask.size != image.size:
                return BadSample(str(ref.mask), f"bad mask: {mask.size[0]}x{mask.size[1]} but its image "
                                                f"{ref.image.name} is {image.size[0]}x{image.size[1]}")
        if (s.mask_mode or mask_mode) == "alpha" and "A" not in image.getbands() and ref.mask is None:
            log.info("%s has no alpha channel: with mask_mode alpha its mask is the whole rectangle", ref.image)
    return None


def validate(samples: list[Sample], num_frames: int | list[int], fps: float, buckets: list[list[int]],
             mask_mode: str = "rectangle", *, sampling: str = "head", windows: int = 1, upscale: bool = False,
             progress: bool = False) -> DatasetReport:
    """Check every sample; the report holds the usable ones (one per training window) and the others
    with their reason."""
    from tqdm.auto import tqdm

    counts = [num_frames] if isinstance(num_frames, int) else list(num_frames)
    report = DatasetReport()
    for s in tqdm(samples, desc="checking samples", unit="sample", disable=not progress or len(samples) < 2):
        problem = _check_sample(s, counts, fps, buckets, mask_mode, upscale)
        if problem is not None:
            report.bad.append(problem)
            continue
        starts = [0] if s.is_image else window_starts(s.source_frames, s.source_fps, s.num_frames, fps, sampling,
                                                      windows)
        if len(starts) == 1 and sampling == "head":
            report.good.append(s)
            continue
        for start in starts:  # one training sample per window, named by its first source frame
            report.good.append(replace(s, name=f"{s.name}@{start}", start=start))
    return report


def load_dataset(path: str | Path | list[tuple[str, int]], num_frames: int | list[int], fps: float,
                 buckets: list[list[int]], mask_mode: str = "rectangle", **options: Any) -> DatasetReport:
    """Discover and validate: what the trainer calls. ``path`` may be a list of ``(path, repeats)``;
    ``options`` go to :func:`validate`."""
    datasets = [(path, 1)] if isinstance(path, (str, Path)) else list(path)
    samples, bad = [], []
    for one, repeats in datasets:
        found, wrong = discover(one)
        for s in found:
            s.repeats = repeats
        samples += found
        bad += wrong
    report = validate(samples, num_frames, fps, buckets, mask_mode, **options)
    report.bad[:0] = bad
    return report


# ------------------------------------------------------------------------------------------ loading
def load_clip(sample: Sample, num_frames: int, fps: float, size: tuple[int, int]) -> torch.Tensor:
    """The training clip as ``[1, 3, N, H, W]`` in [-1, 1] for a bucket ``size = (W, H)``, from source
    frame ``sample.start`` (an image sample: its one frame)."""
    if sample.is_image:
        frames = np.asarray(load_rgb(sample.video))[None]
        idx = [0]
    else:
        from bindweave_core.video_io import read_video

        frames, source_fps = read_video(sample.video)
        idx = frame_indices(len(frames), source_fps, num_frames, fps, sample.start)
        if idx is None:
            raise InputError(f"{sample.video}: too few frames ({len(frames)} decoded) for {num_frames} at "
                             f"{fps:g} fps from frame {sample.start}")
    clip = torch.from_numpy(np.ascontiguousarray(frames[idx])).permute(0, 3, 1, 2).float() / 255.0
    clip = resize_cover(clip, *size)
    return (clip * 2.0 - 1.0).permute(1, 0, 2, 3)[None].contiguous()


def resize_cover(frames: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """``[N, 3, h, w]`` scaled to cover ``width x height`` (antialiased bilinear), then centre-cropped."""
    h, w = frames.shape[-2:]
    s = max(width / w, height / h)
    new_h, new_w = max(height, round(h * s)), max(width, round(w * s))
    if (new_h, new_w) != (h, w):
        frames = F.interpolate(frames, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return frames[..., top:top + height, left:left + width].clamp(0, 1)


def load_references(sample: Sample) -> tuple[list[Image.Image], list[Image.Image | None]]:
    """The reference images (RGBA kept) and their masks (``L``, or None)."""
    images = [load_image(r.image) for r in sample.references]
    masks = [load_image(r.mask).convert("L") if r.mask is not None else None for r in sample.references]
    return images, masks


# ------------------------------------------------------------------------------------------ order
class BatchOrder:
    """Which samples each micro-step uses: a pure function of (seed, micro-step, process).

    Every epoch shuffles each bucket's samples with a generator seeded by (seed, epoch), cuts them
    into batches of ``batch_size`` (one bucket per batch; the last batch of a bucket may be
    smaller), shuffles the batches, trims them to a multiple of the process count and deals them
    out round-robin. Resuming needs only the micro-step count.
    """

    def __init__(self, buckets: list[tuple[int, int]], batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.groups: dict[tuple[int, int], list[int]] = {}
        for i, b in enumerate(buckets):
            self.groups.setdefault(tuple(b), []).append(i)
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        batches = sum(math.ceil(len(g) / batch_size) for g in self.groups.values())
        self.per_process = batches // world
        if self.per_process == 0:
            raise InputError(f"{len(buckets)} samples make {batches} batches of {batch_size}: too few for {world} "
                             "processes. Add samples, lower train.batch_size or use fewer GPUs.")
        self._epoch: tuple[int, list[list[int]]] | None = None

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This process's batches (sample indices) of ``epoch``."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        batches = []
        for key in sorted(self.groups):
            members = self.groups[key]
            order = [members[i] for i in torch.randperm(len(members), generator=g).tolist()]
            batches += [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        batches = batches[: self.per_process * self.world]
        return batches[self.rank::self.world]

    def batch(self, micro_step: int) -> list[int]:
        epoch, position = divmod(micro_step, self.per_process)
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, self.epoch_batches(epoch))
        return self._epoch[1][position]

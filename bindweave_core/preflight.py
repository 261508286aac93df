"""Checks that run before any model loads, so no bad input costs a user a run or a file.

* settings in their valid ranges: ``bindweave_core.setting_bounds`` (``GenerationSettings`` checks its
  fields there when it is made, so the CLI, the Python API and the ComfyUI nodes refuse the same values);
* output and sidecar paths: writable, not folders, not any input file (:func:`check_output_paths`);
* prompt files as UTF-8 (:func:`read_prompt_file`), images readable and decodable (:func:`check_images`),
  model paths present (:func:`check_model_paths`);
* the device exists in this PyTorch build (:func:`check_device`);
* memory: the DiT stage's estimated peak against the free GPU memory, or on the CPU against the
  memory this machine has available (:func:`check_cpu_memory`; the GPU check is
  ``runtime.preflight``, both from ``bindweave_core.memory``'s estimate).

Nothing here imports torch at module level: ``generate --help`` stays fast.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from . import constants as C
from .errors import InputError, OutOfMemoryError

GiB = 1024 ** 3


# ---------------------------------------------------------------------------------- files
def _resolved(path: str | os.PathLike) -> Path:
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path)))).resolve()


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)  # hard links and symlinks too
    except OSError:
        return _resolved(a) == _resolved(b)


def _overwrites(target: Path, source: Path) -> bool:
    """Whether writing ``target`` replaces the input ``source`` (or a file inside the input folder ``source``)."""
    if _same_file(target, source):
        return True
    if source.is_dir() and target.is_file():
        return _resolved(source) in _resolved(target).parents
    return False


def _check_writable(path: Path, flag: str) -> None:
    if path.is_dir():
        raise InputError(f"{flag} {path} is a folder; give a file name inside it, e.g. {path / 'video.mp4'}.")
    ancestor = path.parent
    while not ancestor.exists():
        if ancestor == ancestor.parent:
            break
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(f"{flag} {path}: {ancestor} is a file, so no folder can be made there. Choose another "
                         "output folder.")
    try:  # os.access is not enough: root passes it on read-only folders, /proc refuses new files anyway
        fd, probe = tempfile.mkstemp(prefix=".bindweave-write-test-", dir=ancestor)
    except OSError as e:
        raise InputError(f"{flag} {path}: cannot write in {ancestor} ({e.strerror or e}). Choose a folder you can "
                         "write to.") from None
    os.close(fd)
    os.unlink(probe)


def check_output_paths(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None],
                       flag: str = "--out") -> tuple[Path, Path]:
    """``(video path, sidecar path)`` once both can be written without replacing any input."""
    video = Path(out).expanduser()
    if video.suffix.lower() != ".mp4":
        raise InputError(f"{flag} must end in .mp4, got {video.name}.")
    sidecar = video.with_suffix(".json")
    sources = [Path(p).expanduser() for p in inputs if p]
    for target, what in ((video, "the video"), (sidecar, "its .json sidecar")):
        for source in sources:
            if source.exists() and _overwrites(target, source):
                inside = "" if _same_file(target, source) else f" (inside the input folder {source})"
                raise InputError(f"{flag} {video}: writing {what} {target}{inside} would overwrite an input file "
                                 f"({source}). Choose another output name.")
        _check_writable(target, flag)
    return video, sidecar


def check_output_file(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None], flag: str,
                      suffix: str) -> Path:
    """One output file (ending in ``suffix``) that can be written without replacing any input."""
    target = Path(out).expanduser()
    if target.suffix.lower() != suffix:
        raise InputError(f"{flag} must end in {suffix}, got {target.name}.")
    for source in (Path(p).expanduser() for p in inputs if p):
        if source.exists() and _overwrites(target, source):
            raise InputError(f"{flag} {target} would overwrite an input file ({source}). Choose another output name.")
    _check_writable(target, flag)
    return target


def read_prompt_file(path: str | os.PathLike) -> str:
    """The prompt in a UTF-8 text file, stripped; clear errors for missing, binary or empty files."""
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"--prompt-file {p} not found. Check the path.")
    if p.is_dir():
        raise InputError(f"--prompt-file {p} is a folder; give the text file that holds the prompt.")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise InputError(f"--prompt-file {p}: cannot read it ({e.strerror or e}).") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"--prompt-file {p} is not UTF-8 text (byte {e.start} is 0x{data[e.start]:02x}). Save it "
                         "as UTF-8, or pass the prompt with --prompt.") from None
    if not text.strip():
        raise InputError(f"--prompt-file {p} is empty: write the prompt in it.")
    return text.strip()


def check_images(references: Iterable[str | os.PathLike], masks: Iterable[str | os.PathLike] | None = None) -> None:
    """Every reference and mask file opens and decodes (the same reader the pipeline uses)."""
    from .images import open_image

    for i, ref in enumerate(references):
        open_image(ref, f"reference image {i + 1}")
    for i, mask in enumerate(masks or []):
        open_image(mask, f"mask {i + 1}")


def check_model_paths(paths: dict[str, str | None]) -> None:
    """Each given model file or folder exists (``{"--dit": path, ...}``)."""
    for flag, path in paths.items():
        if path and not Path(path).expanduser().exists():
            raise InputError(f"{flag} {path} not found. Check the path (a file, or a Hugging Face folder).")
        if path and not os.access(Path(path).expanduser(), os.R_OK):
            raise InputError(f"{flag} {path} cannot be read (permissions). Check who owns it.")


# ---------------------------------------------------------------------------------- device
def check_device(device: Any) -> None:
    """The device exists in this PyTorch build and on this machine (``None``: the default)."""
    if device is None:
        return
    import torch

    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"--device {device!r} is not a device name; use cuda, cuda:1 or cpu.") from None
    if d.type == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            raise InputError(f"--device {device}: this PyTorch is a CPU-only build, it cannot use a GPU. Install a "
                             "CUDA build of torch (see the README's set-up) or use --device cpu.")
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InputError(f"--device {device}: no CUDA GPU is visible (check the driver and "
                             "CUDA_VISIBLE_DEVICES), or use --device cpu.")
        if d.index is not None and d.index >= count:
            raise InputError(f"--device {device}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}.")
    elif d.type == "mps":
        if not torch.backends.mps.is_available():
            raise InputError(f"--device {device}: Apple's MPS is not available here; use --device cpu.")
    elif d.type != "cpu":
        backend = getattr(torch, d.type, None)
        if backend is None or not getattr(backend, "is_available", lambda: False)():
            raise InputError(f"--device {device}: no {d.type} device is available; use cuda or cpu.")


# ---------------------------------------------------------------------------------- CPU memory
def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_available() -> int | None:
    """Room left under a container's memory limit (cgroup v2, then v1), if there is one."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:
            return max(int(limit) - usage, 0)
    return None


def available_cpu_memory() -> int | None:
    """Bytes a new allocation can use in RAM: MemAvailable, or less under a container limit; None if unknown."""
    known = [v for v in (_meminfo_available(), _cgroup_available()) if v is not None]
    return min(known) if known else None


def _fitting_settings(config: Any, shape: Any, free: int) -> list[tuple[str, Any]]:
    """Unbatched guidance, a smaller size (same aspect ratio) or a shorter video, each the largest that fits."""
    from .memory import estimate_vram

    out = []
    if shape.batch > 1:
        est = estimate_vram(config, shape.replace(batch=1))
        if est.fits(free):
            out.append(("--cfg-batch separate (cond and uncond one after the other)", est))
    for factor in (0.75, 0.5, 0.375, 0.25, 0.125, 0.0625):
        w = max(C.SIZE_MULTIPLE, int(shape.width * factor) // C.SIZE_MULTIPLE * C.SIZE_MULTIPLE)
        h = max(C.SIZE_MULTIPLE, int(shape.height * factor) // C.SIZE_MULTIPLE * C.SIZE_MULTIPLE)
        est = estimate_vram(config, shape.replace(width=w, height=h))
        if est.fits(free):
            out.append((f"--width {w} --height {h}", est))
            break
    frames = shape.num_frames
    while frames > 1:
        frames = max(1, (frames - 1) // 8 * 4 + 1)  # halve, staying 4k+1
        est = estimate_vram(config, shape.replace(num_frames=frames))
        if est.fits(free):
            out.append((f"--frames {frames}", est))
            break
    return out


def check_cpu_memory(config: Any, shape: Any, free: int | None, memory_check: bool = True) -> Any:
    """The DiT stage's estimate on the CPU; :class:`OutOfMemoryError` with settings that fit when it
    exceeds the memory this machine has available (``free``, None: unknown, no check)."""
    import logging

    from .memory import estimate_vram

    est = estimate_vram(config, shape)
    log = logging.getLogger("BindWeave")
    if free is None:
        log.debug("estimated peak memory of the DiT stage: %s", est.describe())
        return est
    log.info("estimated peak memory of the DiT stage: %s; %.1f GiB available on the CPU", est.describe(), free / GiB)
    if memory_check and not est.fits(free):
        lines = [f"this run will not fit in this machine's memory (cpu): estimated peak {est.describe()}, "
                 f"{free / GiB:.1f} GiB available ({shape.width}x{shape.height}, {shape.num_frames} frames, "
                 f"{str(shape.dtype).replace('torch.', '')})."]
        fitting = _fitting_settings(config, shape, free)
        if fitting:
            lines.append("Settings that would fit (estimated peak each):")
            lines += [f"  {label}: {alt.total / GiB:.1f} GiB" for label, alt in fitting]
        lines.append("Close other programs, run on a GPU, or, if the estimate is too cautious, try anyway with "
                     "--no-memory-check (RuntimeOptions(memory_check=False)).")
        raise OutOfMemoryError("\n".join(lines))
    return est

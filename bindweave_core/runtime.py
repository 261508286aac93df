"""Speed and memory options of a generation run, and how the pipeline applies them.

``RuntimeOptions`` gathers what changes where and how the models run, never what they compute
(fp8 and attention kernels are loader settings: ``weight_format``, ``attention``):

* ``block_offload=k``: keep ``k`` DiT blocks on the GPU and stream the others from pinned CPU
  memory (``dit.offload``); ``prefetch_blocks`` are copied ahead on a side stream;
* ``compile``: ``torch.compile`` of the repeated transformer block (``dit.compile``);
* ``parallel``: ``ulysses`` / ``ring`` context parallelism or ``cfg`` split over ranks launched
  with torchrun (``dit.parallel``);
* ``vae_tiling``: encode/decode the video in spatial tiles (less VAE memory, seams blended);
* ``memory_check``: refuse a run whose estimated peak does not fit the free GPU memory (on the CPU:
  the RAM available, ``preflight.check_cpu_memory``), naming the settings that would (``memory``).
"""

from __future__ import annotations

import logging
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from .errors import InputError, OutOfMemoryError

if TYPE_CHECKING:
    import torch

log = logging.getLogger("BindWeave")


@dataclass
class RuntimeOptions:
    block_offload: int | None = None  # resident DiT blocks; None: the whole DiT on the device
    prefetch_blocks: int = 1
    compile: bool = False
    compile_mode: str | None = None
    compile_backend: str = "inductor"
    parallel: str = "none"  # none | ulysses | ring | cfg
    vae_tiling: bool = False
    memory_check: bool = True

    def __post_init__(self) -> None:
        from .dit.compile import COMPILE_MODES
        from .dit.parallel import PARALLEL_MODES

        if self.parallel not in PARALLEL_MODES:
            raise InputError(f"parallel must be one of {PARALLEL_MODES}, got {self.parallel!r}")
        if self.block_offload is not None and self.block_offload < 0:
            raise InputError(f"block offload keeps 0 or more blocks on the GPU, got {self.block_offload}")
        if self.prefetch_blocks < 0:
            raise InputError(f"prefetch blocks must be 0 or more, got {self.prefetch_blocks}")
        if self.compile_mode not in COMPILE_MODES:
            raise InputError(f"compile mode must be one of {COMPILE_MODES}, got {self.compile_mode!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------- placement
def place_dit(dit: torch.nn.Module, options: RuntimeOptions, device: torch.device) -> None:
    """Put the DiT on ``device`` as ``options`` say: compiled blocks, then context parallelism (its
    hooks wrap the compiled forward), then the weights (whole, or resident blocks + streaming)."""
    from .dit.compile import compile_blocks, is_compiled
    from .dit.offload import disable_block_offload, enable_block_offload

    if options.compile and not is_compiled(dit):
        compile_blocks(dit, backend=options.compile_backend, mode=options.compile_mode)
    if options.parallel in ("ulysses", "ring") and getattr(dit, "_parallel_config", None) is None:
        import torch.distributed as dist

        from .dit.parallel import enable_context_parallel

        world = dist.get_world_size() if dist.is_initialized() else 1
        enable_context_parallel(dit, device=device, ulysses_degree=world if options.parallel == "ulysses" else None,
                                ring_degree=world if options.parallel == "ring" else None)
    offload = getattr(dit, "block_offload", None)
    if options.block_offload is None:
        if offload is not None:
            disable_block_offload(dit)
        dit.to(device)
        return
    k = min(options.block_offload, len(dit.blocks))
    prefetch = min(options.prefetch_blocks, max(len(dit.blocks) - k - 1, 0))
    if (offload is None or offload.resident_blocks != k or offload.device.type != device.type
            or offload.prefetch_blocks != prefetch):
        enable_block_offload(dit, resident_blocks=k, device=device, prefetch_blocks=options.prefetch_blocks)
    else:
        offload.place()


def prepare_component(name: str, component: Any, module: torch.nn.Module, options: RuntimeOptions,
                      device: torch.device) -> None:
    """The pipeline's ``on_device`` step for one component."""
    if name == "dit":
        place_dit(module, options, device)
        return
    module.to(device)
    if name == "vae" and options.vae_tiling and not component.tiling:
        component.enable_tiling()


def wrap_predictor(predict: Any, options: RuntimeOptions) -> Any:
    """The sampler's predictor, split over two ranks for ``parallel="cfg"``."""
    if options.parallel != "cfg":
        return predict
    from .dit.parallel import cfg_parallel_predictor

    return cfg_parallel_predictor(predict)


# ---------------------------------------------------------------------------------- memory
def dit_description(pipe: Any) -> tuple[Any, torch.dtype, str] | None:
    """``(config, dtype, weight_format)`` of the pipeline's DiT, loaded or not (None if unknown)."""
    import torch

    from .fp8 import FP8Linear
    from .lazy import Lazy

    dit = pipe.current("dit")
    if isinstance(dit, Lazy):
        meta = getattr(dit, "meta", None) or {}
        if "config" not in meta:
            return None
        return meta["config"], meta.get("dtype") or torch.bfloat16, meta.get("weight_format", "default")
    if dit is None or not hasattr(dit, "dit_config"):
        return None
    fp8 = [m for m in dit.modules() if isinstance(m, FP8Linear)]
    fmt = "default" if not fp8 else ("fp8_fast" if any(m.matmul == "scaled_mm" for m in fp8) else "fp8")
    return dit.dit_config, dit.patch_embedding.weight.dtype, fmt


def run_shape(pipe: Any, settings: Any, dtype: torch.dtype, weight_format: str, batch: int):
    """The :class:`~bindweave_core.memory.RunShape` of a generation with this pipeline."""
    from .memory import RunShape

    options: RuntimeOptions = pipe.runtime
    cp = 1
    if options.parallel in ("ulysses", "ring"):
        import torch.distributed as dist

        cp = dist.get_world_size() if dist.is_initialized() else 1
    return RunShape(settings.width, settings.height, settings.num_frames, batch=batch, dtype=dtype,
                    weight_format=weight_format, resident_blocks=options.block_offload,
                    prefetch_blocks=options.prefetch_blocks, cp_degree=cp)


def _dit_batch(pipe: Any, settings: Any) -> int:
    """The preflight's batch: "auto" counts as batched (the larger need)."""
    from .sampling import guidance_batch

    return guidance_batch(settings.guidance, settings.cfg_batch != "separate", pipe.runtime.parallel == "cfg")


def preflight(pipe: Any, settings: Any):
    """Log the estimated peak GPU memory of the DiT stage before anything runs, and raise
    :class:`OutOfMemoryError` (with the settings to change) when it cannot fit. Returns the estimate."""
    import torch

    from .device_memory import make_room
    from .memory import FIT_MARGIN, GiB, check_fits, estimate_vram, free_device_memory

    described = dit_description(pipe)
    if described is None:
        return None
    config, dtype, fmt = described
    shape = run_shape(pipe, settings, dtype, fmt, _dit_batch(pipe, settings))
    if pipe.device.type == "cuda":  # a host unloads its idle models first: only memory it cannot free counts
        make_room(pipe.device, int(FIT_MARGIN * estimate_vram(config, shape).total) - _weights_on(pipe, pipe.device))
    free = free_device_memory(pipe.device)
    if free is None and pipe.device.type == "cpu":  # RAM: what this machine has available
        from .preflight import available_cpu_memory, check_cpu_memory

        free = available_cpu_memory()
        dit = pipe.current("dit")
        if free is not None and isinstance(dit, torch.nn.Module):  # weights already in RAM count as free
            free += sum(t.nbytes for t in list(dit.parameters()) + list(dit.buffers()) if t.device.type == "cpu")
        return check_cpu_memory(config, shape, free, pipe.runtime.memory_check)
    if free is None:
        est = estimate_vram(config, shape)
        log.debug("estimated peak memory of the DiT stage: %s", est.describe())
        return est
    free += _weights_on(pipe, pipe.device)  # weights already on the device count as free for this run
    if shape.batch == 2 and settings.cfg_batch == "auto" and not estimate_vram(config, shape).fits(free):
        shape = shape.replace(batch=1)  # auto batching will run cond and uncond one after the other
    est = estimate_vram(config, shape)
    log.info("estimated peak GPU memory of the DiT stage: %s; %.1f GiB free on %s", est.describe(), free / GiB,
             pipe.device)
    if pipe.runtime.memory_check:
        check_fits(config, shape, free, pipe.device)
    return est


def _weights_on(pipe: Any, device: Any) -> int:
    """Bytes of the loaded DiT's weights already on ``device``."""
    import torch

    dit = pipe.loaded("dit")
    if not isinstance(dit, torch.nn.Module):
        return 0
    return sum(t.nbytes for t in list(dit.parameters()) + list(dit.buffers()) if t.device == device)


@contextmanager
def oom_guard(pipe: Any, settings: Any, batch: int):
    """Turn a CUDA out-of-memory error during sampling into :class:`OutOfMemoryError` with the
    settings to change; the failed step's tensors are freed first."""
    import torch

    try:
        yield
    except torch.OutOfMemoryError as e:
        from .device_memory import release_memory
        from .memory import free_device_memory, memory_message

        text = str(e).strip()
        first_line = text.splitlines()[0] if text else "CUDA out of memory"
        traceback.clear_frames(e.__traceback__)  # the frames hold the failed step's tensors
        e.__traceback__ = None
        release_memory()
        described = dit_description(pipe)
        if described is None:
            raise OutOfMemoryError(f"ran out of GPU memory during sampling ({first_line}). Try --weight-format "
                                   "fp8, --block-offload 0, --cfg-batch separate or a smaller size.") from None
        config, dtype, fmt = described
        shape = run_shape(pipe, settings, dtype, fmt, batch)
        free = free_device_memory(pipe.device) or 0
        raise OutOfMemoryError(memory_message(config, shape, free, pipe.device, during_run=first_line)) from None


# ---------------------------------------------------------------------------------- command line
def add_runtime_arguments(group: Any) -> None:
    """The speed/memory options of ``python -m bindweave_core generate``."""
    group.add_argument("--block-offload", type=int, metavar="K",
                       help="keep K of the DiT's blocks on the GPU and stream the others from pinned CPU memory "
                            "(0 = least GPU memory; the 14B DiT has 40 blocks; default: no offload)")
    group.add_argument("--prefetch-blocks", type=int, default=1, metavar="P",
                       help="with --block-offload: blocks copied ahead while one runs (default 1)")
    group.add_argument("--compile", action="store_true",
                       help="torch.compile the repeated DiT block (the first step compiles, later steps are faster)")
    group.add_argument("--compile-mode", choices=("default", "max-autotune-no-cudagraphs"),
                       help="with --compile: torch.compile's mode (default: torch's own)")
    group.add_argument("--vae-tiling", action="store_true", help="VAE encode/decode in spatial tiles (less memory)")
    group.add_argument("--parallel", choices=("none", "ulysses", "ring", "cfg"), default="none",
                       help="multi-GPU, launched with torchrun --nproc-per-node N: ulysses/ring split the token "
                            "sequence over N GPUs; cfg runs cond and uncond on 2 GPUs")
    group.add_argument("--no-memory-check", action="store_true",
                       help="run even when the estimated peak memory exceeds the free GPU memory (on the CPU: "
                            "the RAM this machine has available)")


def runtime_from_args(args: Any) -> tuple[RuntimeOptions, str | None]:
    """``(RuntimeOptions, device)`` from parsed arguments; joins the torchrun process group for
    ``--parallel`` (each rank then uses its own GPU)."""
    import torch

    options = RuntimeOptions(block_offload=args.block_offload, prefetch_blocks=args.prefetch_blocks,
                             compile=args.compile, compile_mode=args.compile_mode, parallel=args.parallel,
                             vae_tiling=args.vae_tiling, memory_check=not args.no_memory_check)
    device = args.device
    if options.parallel != "none":
        from .dit.parallel import init_distributed

        _, _, rank_device = init_distributed()
        if device is not None and torch.device(device).type != rank_device.type:
            raise InputError(f"--device {device} does not match the multi-GPU device {rank_device.type}")
        device = str(rank_device)
    return options, device

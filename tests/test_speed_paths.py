"""Speed and memory paths on the CPU: every backend/format agrees with the fp32 SDPA path within a
stated tolerance, block offload and context parallelism are exact, the memory check speaks up.

Tolerances (tiny random DiT, weights ~N(0, 0.2), output RMS ~2.3; measured values in brackets):
relative RMS error ``||out - ref|| / ||ref||`` against the fp32 SDPA output

* bf16 weights + activations:        <= 3e-2  [7.8e-3]
* fp16 weights + activations:        <= 5e-3  [8.7e-4]
* fp8 storage (fp32 / bf16 compute): <= 1e-1  [5.0e-2 / 5.1e-2]
* fp8 matmul (torch._scaled_mm, one linear, vs upcast): <= 6e-2 [2.6e-2]

exact (``torch.equal``): sage/flash requested on the CPU (fall back to sdpa), fp8_fast on the CPU
(falls back to fp8 upcast), block offload with 0..all resident blocks, regional compile with the
``eager`` backend (inductor would take minutes on two cores; it only changes float32 rounding);
<= 1e-5 absolute: context parallelism over 2 gloo processes (Ulysses is exact here, ring merges
chunk softmaxes by log-sum-exp) and the cond/uncond split.
"""

from __future__ import annotations

import logging
from datetime import timedelta

import pytest
import torch
import torch.nn.functional as F

from bindweave_core import fp8 as FP8
from bindweave_core.checkpoints.writers import atomic_save_file
from bindweave_core.config import PRESETS
from bindweave_core.dit import attention as A
from bindweave_core.dit import build_dit
from bindweave_core.dit.compile import compile_blocks
from bindweave_core.dit.loading import load_dit
from bindweave_core.dit.offload import disable_block_offload, enable_block_offload
from bindweave_core.dit.positions import grid_positions
from bindweave_core.dit.rope import RotaryEmbedding3D, apply_rotary, prepare_rotary
from bindweave_core.errors import InputError, OutOfMemoryError
from helpers import randomize_

CFG = PRESETS["tiny"].replace(num_layers=3)
REL_RMS = {torch.bfloat16: 3e-2, torch.float16: 5e-3}
FP8_REL_RMS = 1e-1
SCALED_MM_REL_RMS = 6e-2
PARALLEL_ATOL = 1e-5


def rel_rms(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


def make_inputs(batch: int = 1, seed: int = 2, frames: int = 2):
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(batch, 16, frames, 4, 6, generator=g),
                t=torch.full((batch,), 500.0),
                t5=torch.randn(batch, 512, CFG.text_dim, generator=g),
                clip=torch.randn(batch, 1028, CFG.image_dim, generator=g),
                planner=torch.randn(batch, 5, CFG.planner_dim, generator=g),
                cond=torch.randn(batch, 20, 4 + frames, 4, 6, generator=g))


def run(model, inp, dtype=torch.float32, **kw):
    with torch.no_grad():
        return model(inp["x"].to(dtype), inp["t"], inp["t5"].to(dtype), inp["clip"].to(dtype),
                     planner_states=inp["planner"].to(dtype), condition=inp["cond"].to(dtype), **kw).float()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """The tiny DiT's random weights as a file (every format goes through the real loader)."""
    model = randomize_(build_dit(CFG), seed=1)
    path = tmp_path_factory.mktemp("dit") / "tiny.safetensors"
    atomic_save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


@pytest.fixture(scope="module")
def reference(weights):
    torch.set_num_threads(2)  # as conftest's per-test fixture does: module fixtures run before it
    model = load_dit(weights, dtype=torch.float32, config=CFG)
    return model, run(model, make_inputs())


# ------------------------------------------------------------------------------------------ formats
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_agrees_with_fp32(weights, reference, dtype):
    model = load_dit(weights, dtype=dtype, config=CFG)
    assert rel_rms(run(model, make_inputs(), dtype), reference[1]) <= REL_RMS[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_storage_agrees_with_fp32(weights, reference, dtype):
    model = load_dit(weights, dtype=dtype, config=CFG, weight_format="fp8")
    assert model.blocks[0].attn1.to_q.weight.dtype == torch.float8_e4m3fn
    assert rel_rms(run(model, make_inputs(), dtype), reference[1]) <= FP8_REL_RMS


def test_fp8_fast_falls_back_to_upcast_on_cpu_and_says_why_once(weights, caplog):
    FP8._scaled_mm_reason.cache_clear()
    upcast = load_dit(weights, dtype=torch.bfloat16, config=CFG, weight_format="fp8")
    with caplog.at_level(logging.WARNING, logger="BindWeave"):
        fast = load_dit(weights, dtype=torch.bfloat16, config=CFG, weight_format="fp8_scaled_mm")  # alias
        out = [run(fast, make_inputs(), torch.bfloat16) for _ in range(2)]
    layers = [m for m in fast.modules() if isinstance(m, FP8.FP8Linear)]
    assert layers and all(m.matmul == "scaled_mm" for m in layers)
    assert torch.equal(out[0], run(upcast, make_inputs(), torch.bfloat16)) and torch.equal(out[0], out[1])
    said = [r.getMessage() for r in caplog.records if "fp8 matmul" in r.getMessage()]
    assert len(said) == 1 and "compute capability >= 8.9" in said[0] and "cpu" in said[0]


def test_scaled_mm_matmul_math(caplog):
    """The fp8 x fp8 path itself (per-tensor scales), run through torch._scaled_mm's CPU kernel."""
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(96, 64, generator=g) * 0.2
    wq, ws = FP8.quantize_weight(weight)
    x = (torch.randn(2, 37, 64, generator=g) * 3).bfloat16()
    xq, xs = FP8.quantize_activation(x.reshape(-1, 64))
    assert xq.dtype == torch.float8_e4m3fn and xq.float().abs().max() <= FP8.FP8_MAX
    # e4m3 keeps 3 mantissa bits: every element within 1/16 of the tensor's absolute maximum
    assert ((xq.float() * xs - x.reshape(-1, 64).float()).abs().max() <= x.float().abs().max() / 16).item()
    upcast = F.linear(x, wq.bfloat16() * ws.bfloat16()).float()
    try:
        fast = FP8.scaled_mm_linear(x, wq, ws, torch.zeros(96).bfloat16())
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"needs a kernel this CPU build lacks: CPU fp8 _scaled_mm ({e})")
    assert fast.shape == (2, 37, 96) and fast.dtype == torch.bfloat16
    assert rel_rms(fast, upcast) <= SCALED_MM_REL_RMS
    layer = torch.nn.Linear(64, 96)
    model = torch.nn.Sequential(layer)
    assert FP8.convert_to_fp8(model, ["0"]) == ["0"] and FP8.set_fp8_matmul(model, "scaled_mm") == 1
    with pytest.raises(ValueError, match="upcast"):
        FP8.set_fp8_matmul(model, "int8")


# ------------------------------------------------------------------------------------------ attention
@pytest.mark.parametrize("backend", ["sage", "flash"])
def test_unavailable_backend_falls_back_to_sdpa_logged_once(reference, backend, caplog):
    model, ref = reference
    A.resolve_backend.cache_clear()
    model.set_attention_backend(backend)
    try:
        with caplog.at_level(logging.INFO, logger="BindWeave"):
            outs = [run(model, make_inputs()) for _ in range(2)]
    finally:
        model.set_attention_backend("sdpa")
    assert all(torch.equal(o, ref) for o in outs)
    said = [r.getMessage() for r in caplog.records if f"backend {backend!r} unavailable" in r.getMessage()]
    assert len(said) == 1 and "falling back to sdpa" in said[0]


def test_auto_backend_picks_sdpa_on_cpu_logged_once(reference, caplog):
    model, ref = reference
    A.resolve_backend.cache_clear()
    model.set_attention_backend("auto")
    try:
        with caplog.at_level(logging.INFO, logger="BindWeave"):
            out = [run(model, make_inputs()) for _ in range(2)]
    finally:
        model.set_attention_backend("sdpa")
    assert torch.equal(out[0], ref) and torch.equal(out[1], ref)
    assert sum("auto -> sdpa" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_complex_rotary_equals_the_elementwise_formula(dtype):
    cos, sin = RotaryEmbedding3D(32)(grid_positions(3, 4, 5))
    g = torch.Generator().manual_seed(4)
    fused = torch.randn(2, 60, 9 * 32, generator=g).to(dtype)
    for x in (fused[..., :96].unflatten(-1, (3, 32)), fused.chunk(3, -1)[1].unflatten(-1, (3, 32)),
              fused[:, :, :96].contiguous().unflatten(-1, (3, 32))):
        complex_path = apply_rotary(x, *prepare_rotary((cos, sin)))
        torch.testing.assert_close(complex_path, apply_rotary(x, cos, sin), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------ compile
def test_regional_compile_one_graph_for_all_blocks(weights, reference):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = load_dit(weights, dtype=torch.float32, config=CFG)
    counters.clear()
    assert compile_blocks(model, backend="eager", fullgraph=True) == CFG.num_layers  # fullgraph: no graph breaks
    assert compile_blocks(model, backend="eager") == 0  # idempotent
    out = run(model, make_inputs())
    assert torch.equal(out, reference[1])
    assert counters["stats"]["unique_graphs"] == 1  # the 3 blocks share one compiled graph
    offload = enable_block_offload(model, resident_blocks=1, device="cpu")  # hooks stay outside the graph
    torch.testing.assert_close(run(model, make_inputs()), out, rtol=0, atol=0)
    assert offload.uploads == CFG.num_layers - 1 + 1  # + the next call's first block, prefetched
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------ offload
@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_block_offload_is_exact_for_every_resident_count(weights, reference, prefetch):
    model = load_dit(weights, dtype=torch.float32, config=CFG)
    seen = {}
    for resident in range(CFG.num_layers + 1):
        offload = enable_block_offload(model, resident_blocks=resident, device="cpu", prefetch_blocks=prefetch)
        stored = {i: model.blocks[i].attn1.to_q.weight.data_ptr() for i in offload.streamed}
        hooks = [model.blocks[i].register_forward_pre_hook(
            lambda m, a, i=i: seen.__setitem__(i, m.attn1.to_q.weight.data_ptr())) for i in offload.streamed]
        for _ in range(2):
            assert torch.equal(run(model, make_inputs()), reference[1])
        for h in hooks:
            h.remove()
        streamed = len(offload.streamed)
        assert offload.uploads == 2 * streamed + offload.prefetch_blocks  # + the next call's first ones
        assert offload.max_streamed_on_device <= min(prefetch + 1, max(streamed, 1))
        # while a streamed block ran it used a copy; afterwards it points at the offloaded weights again
        assert all(seen[i] != stored[i] for i in offload.streamed)
        assert all(model.blocks[i].attn1.to_q.weight.data_ptr() == stored[i] for i in offload.streamed)
    disable_block_offload(model)
    assert model.block_offload is None and all(not b._forward_pre_hooks for b in model.blocks)
    with pytest.raises(ValueError, match="between 0 and 3"):
        enable_block_offload(model, resident_blocks=4, device="cpu")


def test_pipeline_block_offload_and_vae_tiling_options():
    from bindweave_core.pipeline import BindWeavePipeline, GenerationSettings
    from bindweave_core.runtime import RuntimeOptions

    settings = GenerationSettings(prompt="a man waves", width=64, height=48, num_frames=5, steps=2)
    ref = BindWeavePipeline.smoke(seed=0).generate(["examples/singleface_1/man.png"], settings)
    pipe = BindWeavePipeline.smoke(seed=0, runtime=RuntimeOptions(block_offload=0, prefetch_blocks=1, vae_tiling=True))
    out = pipe.generate(["examples/singleface_1/man.png"], settings)
    assert torch.equal(out.latents, ref.latents)  # offload is exact
    assert pipe.component("dit").block_offload.resident_blocks == 0 and pipe.component("vae").tiling
    assert pipe.last_estimate is not None and pipe.last_estimate.total > 0
    with pytest.raises(InputError, match="parallel"):
        RuntimeOptions(parallel="tensor")


# ------------------------------------------------------------------------------------------ multi-process
def _parallel_worker(rank: int, world: int, init: str, out_path: str) -> None:
    import torch.distributed as dist

    from bindweave_core.denoiser import DiTBranch, make_predictor
    from bindweave_core.dit.parallel import cfg_parallel_predictor, enable_context_parallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=120))
    inp = make_inputs(batch=2)
    lengths = [5, 3]  # cond + uncond batched with different planner lengths
    results = {}
    for mode in ("ulysses", "ring"):
        model = randomize_(build_dit(CFG), seed=1)
        enable_context_parallel(model, ulysses_degree=world if mode == "ulysses" else None,
                                ring_degree=world if mode == "ring" else None)
        results[mode] = run(model, inp, planner_lengths=lengths)
        results[mode + "_again"] = run(model, inp, planner_lengths=lengths)  # rotary cache of the shard
        if mode == "ulysses":
            odd = make_inputs(batch=1, frames=1)
            odd["x"], odd["cond"] = odd["x"][..., :2, :2], odd["cond"][..., :2, :2]  # (4 + 1) x 1 x 1 = 5 tokens
            try:
                run(model, odd)
                results["odd_error"] = ""
            except InputError as e:
                results["odd_error"] = str(e)
    model = randomize_(build_dit(CFG), seed=1)
    one = make_inputs(batch=1)
    cond = DiTBranch(one["t5"], one["planner"], one["clip"], one["cond"])
    uncond = DiTBranch(one["t5"] * 0.5, one["planner"][:, :3], one["clip"], one["cond"])
    predict = cfg_parallel_predictor(make_predictor(model, cond, uncond))
    results["cfg"] = predict(one["x"], one["t"], "both")
    if rank == 0:
        torch.save(results, out_path)
    dist.barrier()
    dist.destroy_process_group()


def test_context_parallel_two_gloo_processes_match_one_process(tmp_path):
    import torch.multiprocessing as mp

    from bindweave_core.denoiser import DiTBranch, make_predictor

    out_path = tmp_path / "parallel.pt"
    mp.spawn(_parallel_worker, args=(2, f"file://{tmp_path / 'rendezvous'}", str(out_path)), nprocs=2, join=True)
    got = torch.load(out_path)
    model = randomize_(build_dit(CFG), seed=1)
    single = run(model, make_inputs(batch=2), planner_lengths=[5, 3])
    for key in ("ulysses", "ulysses_again", "ring", "ring_again"):
        assert got[key].shape == single.shape
        assert (got[key] - single).abs().max().item() <= PARALLEL_ATOL, key
    assert "not divisible by 2" in got["odd_error"]
    one = make_inputs(batch=1)
    cond = DiTBranch(one["t5"], one["planner"], one["clip"], one["cond"])
    uncond = DiTBranch(one["t5"] * 0.5, one["planner"][:, :3], one["clip"], one["cond"])
    predict = make_predictor(model, cond, uncond)
    expected = torch.cat([predict(one["x"], one["t"], "cond"), predict(one["x"], one["t"], "uncond")])
    assert (got["cfg"] - expected).abs().max().item() <= PARALLEL_ATOL


# ------------------------------------------------------------------------------------------ memory
def test_vram_estimate_orders_the_settings():
    from bindweave_core.memory import GiB, RunShape, estimate_vram, weight_bytes

    cfg = PRESETS["bindweave-14b"]
    other, block = weight_bytes(cfg, torch.bfloat16, "default")
    total_params = 16_426_344_256
    assert 2 * total_params <= other + 40 * block <= 2.01 * total_params  # bf16, a few fp32 tables
    other8, block8 = weight_bytes(cfg, torch.bfloat16, "fp8")
    assert 0.49 < block8 / block < 0.51 and other8 == other
    base = RunShape(832, 480, 81, batch=2)
    bf16, fp8 = estimate_vram(cfg, base), estimate_vram(cfg, base.replace(weight_format="fp8"))
    assert 30 * GiB < bf16.weights < 31 * GiB and fp8.weights < 0.52 * bf16.weights
    assert estimate_vram(cfg, base.replace(batch=1)).activations * 2 == bf16.activations
    offload = estimate_vram(cfg, base.replace(resident_blocks=10, prefetch_blocks=1))
    assert offload.weights == other + 12 * block  # 10 resident + the block running + 1 prefetched
    assert estimate_vram(cfg, base.replace(cp_degree=2)).activations == -(-bf16.activations // 2)
    hd = estimate_vram(cfg, base.replace(width=1280, height=720))
    assert hd.activations > 2 * bf16.activations and hd.total > bf16.total


def test_memory_check_names_the_settings_that_fit():
    from bindweave_core.memory import GiB, RunShape, check_fits

    cfg = PRESETS["bindweave-14b"]
    shape = RunShape(1280, 720, 81, batch=2)
    with pytest.raises(OutOfMemoryError) as e:
        check_fits(cfg, shape, 22 * GiB, "cuda:0")
    text = str(e.value)
    assert "will not fit on cuda:0" in text and "22.0 GiB free" in text
    for option in ("--cfg-batch separate", "--weight-format fp8", "--block-offload", "--width 832 --height 480",
                   "--frames 41", "--no-memory-check"):
        assert option in text, option
    assert "*" in text  # at least one suggestion fits
    assert check_fits(cfg, shape, 80 * GiB, "cuda:0").total < 80 * GiB


def test_pipeline_refuses_a_run_that_will_not_fit_before_any_model_runs(monkeypatch):
    from bindweave_core import memory
    from bindweave_core.pipeline import BindWeavePipeline, GenerationSettings
    from bindweave_core.runtime import RuntimeOptions

    monkeypatch.setattr(memory, "free_device_memory", lambda device: 1 << 20)  # a "GPU" with 1 MiB free
    pipe = BindWeavePipeline.smoke(seed=0)
    calls = []
    pipe.component("dit").register_forward_hook(lambda *a: calls.append(1))
    settings = GenerationSettings(prompt="a man waves", width=64, height=48, num_frames=5, steps=1)
    with pytest.raises(OutOfMemoryError, match="will not fit"):
        pipe.generate(["examples/singleface_1/man.png"], settings)
    assert not calls
    pipe.runtime = RuntimeOptions(memory_check=False)
    pipe.generate(["examples/singleface_1/man.png"], settings)
    assert calls


def test_out_of_memory_during_sampling_becomes_a_clear_error(monkeypatch):
    from bindweave_core import memory
    from bindweave_core.pipeline import BindWeavePipeline, GenerationSettings

    monkeypatch.setattr(memory, "free_device_memory", lambda device: 64 << 30)
    pipe = BindWeavePipeline.smoke(seed=0)

    def boom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(pipe.component("dit"), "forward", boom)
    settings = GenerationSettings(prompt="a man waves", width=64, height=48, num_frames=5, steps=1)
    with pytest.raises(OutOfMemoryError) as e:
        pipe.generate(["examples/singleface_1/man.png"], settings)
    text = str(e.value)
    assert "during sampling (CUDA out of memory. Tried to allocate 20.00 GiB)" in text
    assert "--block-offload" in text and e.value.__cause__ is None


def test_cli_runtime_options():
    from bindweave_core.cli import build_parser
    from bindweave_core.runtime import runtime_from_args

    base = ["generate", "--ref", "a.png", "--prompt", "p", "--out", "o.mp4"]
    args = build_parser().parse_args(base + ["--block-offload", "0", "--prefetch-blocks", "2", "--vae-tiling",
                                             "--compile", "--no-memory-check", "--weight-format", "fp8_fast"])
    options, device = runtime_from_args(args)
    assert (options.block_offload, options.prefetch_blocks, options.vae_tiling, options.compile,
            options.memory_check, device) == (0, 2, True, True, False, None)
    with pytest.raises(InputError, match="torchrun"):
        runtime_from_args(build_parser().parse_args(base + ["--parallel", "ulysses"]))


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ring_forward_op_returns_the_log_sum_exp(device, dtype):
    """The SDPA op we hand diffusers' ring template: output and per-row log-sum-exp ([B, S, H])."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 50, 3, 32, generator=g).to(device, dtype) for _ in range(3))
    out, lse = A._sdpa_lse_forward_op(None, q, k, v, return_lse=True)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) / 32 ** 0.5
    expected = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.float())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), expected, rtol=tol, atol=tol)
    torch.testing.assert_close(lse.float(), scores.logsumexp(-1).transpose(1, 2), rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------------ GPU only
# Skipped on the CPU; the checks to run when a GPU is lent (same tolerances as above unless stated).
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def cuda_inputs():
    return {k: v.cuda() for k, v in make_inputs().items()}


@needs_cuda
def test_cuda_block_offload_with_side_stream_is_exact(weights):
    model = load_dit(weights, dtype=torch.bfloat16, config=CFG).cuda()
    ref = run(model, cuda_inputs(), torch.bfloat16)
    for resident in (0, 1, CFG.num_layers):
        offload = enable_block_offload(model, resident_blocks=resident, device="cuda", prefetch_blocks=1)
        assert all(model.blocks[i].attn1.to_q.weight.is_pinned() for i in offload.streamed)
        for _ in range(2):
            assert torch.equal(run(model, cuda_inputs(), torch.bfloat16), ref)
    disable_block_offload(model)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_sdpa_half_precision_agrees_with_fp32(weights, dtype):
    ref = run(load_dit(weights, dtype=torch.float32, config=CFG).cuda(), cuda_inputs())
    out = run(load_dit(weights, dtype=dtype, config=CFG).cuda(), cuda_inputs(), dtype)
    assert rel_rms(out, ref) <= REL_RMS[dtype]


@pytest.mark.skipif(not CUDA or torch.cuda.get_device_capability() < FP8.SCALED_MM_MIN_CAPABILITY,
                    reason="needs a CUDA GPU with fp8 tensor cores (compute capability >= 8.9)")
def test_cuda_fp8_matmul_runs_and_agrees(weights, caplog):
    FP8._scaled_mm_reason.cache_clear()
    ref = run(load_dit(weights, dtype=torch.float32, config=CFG).cuda(), cuda_inputs())
    fast = load_dit(weights, dtype=torch.bfloat16, config=CFG, weight_format="fp8_fast").cuda()
    with caplog.at_level(logging.WARNING, logger="BindWeave"):
        out = run(fast, cuda_inputs(), torch.bfloat16)
    assert not [r for r in caplog.records if "fp8 matmul" in r.getMessage()]  # no fallback
    assert rel_rms(out, ref) <= 0.15  # fp8 weights and fp8 activations


@pytest.mark.parametrize("backend", ["sage", "flash"])
def test_cuda_optional_kernels_agree_with_sdpa(backend):
    if not CUDA or not A.is_installed(backend):
        pytest.skip(f"needs a CUDA GPU and the {backend} package")
    cfg = CFG.replace(num_heads=1, head_dim=64)  # SageAttention takes head dims 64/96/128
    model = randomize_(build_dit(cfg), seed=1).to("cuda", torch.bfloat16)
    inp = cuda_inputs()
    ref = run(model, inp, torch.bfloat16)
    model.set_attention_backend(backend)
    assert A.resolve_backend(backend, "cuda", torch.bfloat16, 64) == backend
    assert rel_rms(run(model, inp, torch.bfloat16), ref) <= 3e-2

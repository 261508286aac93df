"""GPU paths checked on the CPU by emulation: attention backends that cannot run fall back with one
logged reason (never crash), batched guidance does not recompile the compiled blocks, and block
offload keeps its streaming window.

The emulated failures are the ones diffusers 0.42.1's ``models/attention_dispatch.py`` reacts to:
it sets ``_CAN_USE_SAGE_ATTN`` / ``_CAN_USE_FLASH_ATTN`` False (and ``sageattn`` / ``flash_attn_func``
None) when the package is missing (``utils/import_utils.py`` then reports version ``"N/A"``),
older than ``_REQUIRED_SAGE_VERSION = "2.1.1"`` / ``_REQUIRED_FLASH_VERSION = "2.6.3"`` or fails to
import; SageAttention's setup.py builds kernels for sm80/86/87/89/90/120 only.
"""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers.models import attention_dispatch as D
from diffusers.utils import import_utils as U

from bindweave_core import fp8 as FP8
from bindweave_core.config import PRESETS
from bindweave_core.dit import attention as A
from bindweave_core.dit import build_dit
from bindweave_core.dit.compile import compile_blocks
from bindweave_core.dit.offload import Transfers, disable_block_offload, enable_block_offload
from helpers import randomize_

CFG = PRESETS["tiny"].replace(num_layers=2)
BF16 = torch.bfloat16


@pytest.fixture(autouse=True)
def fresh_resolution():
    A.resolve_backend.cache_clear()
    A._broken.clear()
    yield
    A.resolve_backend.cache_clear()
    A._broken.clear()


def _usable(monkeypatch, backend: str, version: str, capability=(9, 0)):
    """Emulate a GPU machine where diffusers accepted ``backend`` at ``version``."""
    flag, _, kernel, version_name = A._DIFFUSERS_NAMES[backend]
    monkeypatch.setattr(D, flag, True)
    monkeypatch.setattr(D, kernel, lambda *a, **k: None)
    monkeypatch.setattr(U, version_name, version)
    monkeypatch.setattr(A, "_capability", lambda index: capability)
    monkeypatch.setattr(A, "_device_name", lambda index: "Emulated GPU")


def _refused(monkeypatch, backend: str, version: str):
    """Emulate what diffusers does when it refuses ``backend`` (flag False, kernel None)."""
    flag, _, kernel, version_name = A._DIFFUSERS_NAMES[backend]
    monkeypatch.setattr(D, flag, False)
    monkeypatch.setattr(D, kernel, None)
    monkeypatch.setattr(U, version_name, version)


def _resolve_logged(caplog, requested: str, head_dim: int = 128):
    with caplog.at_level(logging.INFO, logger="BindWeave"):
        got = A.resolve_backend(requested, "cuda", BF16, head_dim, 0)
        again = A.resolve_backend(requested, "cuda", BF16, head_dim, 0)
    said = [r.getMessage() for r in caplog.records if r.name == "BindWeave"]
    assert got == again
    return got, said


def test_everything_usable_auto_picks_sage(monkeypatch, caplog):
    _usable(monkeypatch, "sage", "2.2.0")
    _usable(monkeypatch, "flash", "2.8.3")
    got, said = _resolve_logged(caplog, "auto")
    assert got == "sage" and len(said) == 1 and "auto -> sage" in said[0]


@pytest.mark.parametrize("backend,version,expected", [
    ("sage", "N/A", "package 'sageattention' is not installed (pip install 'sageattention>=2.1.1')"),
    ("sage", "1.0.6", "sageattention 1.0.6 is installed but diffusers"),
    ("flash", "N/A", "package 'flash-attn' is not installed (pip install 'flash-attn>=2.6.3')"),
    ("flash", "2.5.9", "flash-attn 2.5.9 is installed but diffusers"),
])
def test_missing_or_too_old_package_falls_back_with_one_reason(monkeypatch, caplog, backend, version, expected):
    _refused(monkeypatch, backend, version)
    monkeypatch.setattr(A, "_capability", lambda index: (9, 0))
    got, said = _resolve_logged(caplog, backend)
    assert got == "sdpa" and len(said) == 1
    assert expected in said[0] and "falling back to sdpa" in said[0]
    if version != "N/A":
        assert f">= {getattr(D, A._DIFFUSERS_NAMES[backend][1])}" in said[0]


@pytest.mark.parametrize("capability", [(7, 5), (10, 0)])
def test_sage_on_a_gpu_without_its_kernels_falls_back_to_flash_under_auto(monkeypatch, caplog, capability):
    _usable(monkeypatch, "sage", "2.2.0", capability)
    _usable(monkeypatch, "flash", "2.8.3", capability)
    got, said = _resolve_logged(caplog, "sage")
    sm = f"sm{capability[0]}{capability[1]}"
    assert got == "sdpa" and len(said) == 1 and "no kernels for Emulated GPU" in said[0] and sm in said[0]
    caplog.clear()
    auto, said = _resolve_logged(caplog, "auto")
    if capability < (8, 0):  # Turing: no FlashAttention 2 either
        assert auto == "sdpa" and "FlashAttention 2 needs sm80" in said[0]
    else:
        assert auto == "flash"
    assert len(said) == 1


def test_old_diffusers_without_the_flags_falls_back(monkeypatch, caplog):
    monkeypatch.delattr(D, "_CAN_USE_SAGE_ATTN")
    monkeypatch.delattr(D, "_CAN_USE_FLASH_ATTN")
    monkeypatch.setattr(A, "_capability", lambda index: (9, 0))
    got, said = _resolve_logged(caplog, "auto")
    assert got == "sdpa" and len(said) == 1
    assert "has no 'sage' attention backend flag" in said[0] and "has no 'flash' attention backend flag" in said[0]


def test_head_dim_and_dtype_are_checked_after_the_package(monkeypatch, caplog):
    _usable(monkeypatch, "sage", "2.2.0")
    got, said = _resolve_logged(caplog, "sage", head_dim=80)
    assert got == "sdpa" and "head dim 80" in said[0]
    assert A.unavailable_reason("sage", "cuda", torch.float32, 128, 0) == "it needs fp16/bf16 tensors, got torch.float32"


@pytest.mark.parametrize("emulate", ["missing", "too_old", "old_diffusers", "kernel_raises"])
def test_auto_and_explicit_choices_never_crash_a_forward(monkeypatch, caplog, emulate):
    """The whole DiT runs with every choice under every emulated failure and gives the sdpa numbers."""
    model = randomize_(build_dit(CFG), seed=3)
    g = torch.Generator().manual_seed(4)
    x, t = torch.randn(1, 16, 2, 4, 4, generator=g), torch.tensor([500.0])
    t5 = torch.randn(1, 512, CFG.text_dim, generator=g)
    clip = torch.randn(1, 1028, CFG.image_dim, generator=g)
    cond = torch.randn(1, 20, 6, 4, 4, generator=g)
    with torch.no_grad():
        ref = model(x, t, t5, clip, condition=cond)
    if emulate == "missing":
        _refused(monkeypatch, "sage", "N/A")
    elif emulate == "too_old":
        _refused(monkeypatch, "sage", "1.0.6")
    elif emulate == "old_diffusers":
        monkeypatch.delattr(D, "_CAN_USE_SAGE_ATTN")
    else:  # every check passes, then the kernel itself raises (diffusers refuses the call on this machine)
        real = A.unavailable_reason
        monkeypatch.setattr(A, "unavailable_reason",
                            lambda backend, *a: real(backend, *a) if backend in A._broken else None)
    for choice in ("auto", "sage", "flash"):
        A.resolve_backend.cache_clear()
        model.set_attention_backend(choice)
        with caplog.at_level(logging.INFO, logger="BindWeave"), torch.no_grad():
            assert torch.equal(model(x, t, t5, clip, condition=cond), ref)
    if emulate == "kernel_raises":
        said = [r.getMessage() for r in caplog.records if "raised TypeError" in r.getMessage()]
        assert len(said) == 2 and "'sage' raised TypeError" in said[0] and "'flash' raised" in said[1]
        assert "falling back to sdpa for the rest of this run" in said[0]


# ------------------------------------------------------------------------------------------ compile
def test_batched_guidance_with_eight_planner_lengths_compiles_at_most_two_graphs():
    """cond + uncond batched, 8 prompts of different planner lengths: the per-item split is a mask
    tensor built outside the compiled blocks, so only its shape can change the graph."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    model = randomize_(build_dit(CFG), seed=5)
    compiled = randomize_(build_dit(CFG), seed=5)
    compile_blocks(compiled, backend=counting_backend)
    g = torch.Generator().manual_seed(6)
    x, t = torch.randn(1, 16, 2, 4, 4, generator=g).expand(2, -1, -1, -1, -1), torch.tensor([700.0, 700.0])
    t5 = torch.randn(2, 512, CFG.text_dim, generator=g)
    clip = torch.randn(1, 1028, CFG.image_dim, generator=g).expand(2, -1, -1)
    cond = torch.randn(1, 20, 6, 4, 4, generator=g).expand(2, -1, -1, -1, -1)
    try:
        for n in (3, 9, 5, 12, 7, 4, 10, 6):
            planner = torch.randn(2, n + 2, CFG.planner_dim, generator=g)
            kw = dict(planner_states=planner, planner_lengths=[n, n + 2], condition=cond)
            with torch.no_grad():
                torch.testing.assert_close(compiled(x, t, t5, clip, **kw), model(x, t, t5, clip, **kw),
                                           rtol=0, atol=0)
    finally:
        torch._dynamo.reset()
    assert 1 <= len(graphs) <= 2, f"{len(graphs)} graphs compiled over 8 planner lengths"


# ------------------------------------------------------------------------------------------ offload
class FakeGpu(Transfers):
    """A GPU that never finishes anything by itself: compute completes only up to the event the host
    waits on. The worst case for a host that runs ahead: device copies pile up unless the schedule waits."""

    def __init__(self):
        self.seq = 0  # events recorded on the compute stream
        self.completed = 0
        self.copies: list[list] = []  # [device copy, compute event after which it is free (None: in use)]
        self.max_on_device = 0
        self.pinned: list[int] = []

    def pin(self, buffer):
        self.pinned.append(buffer.numel())
        return True

    def upload(self, buffer, device):
        copy = buffer.clone()
        self.copies.append([copy, None])
        self.max_on_device = max(self.max_on_device, len(self.copies))
        return copy, "copied"

    def use(self, copy, event):
        assert event == "copied"

    def block_done(self, copy):
        self.seq += 1
        for entry in self.copies:
            if entry[0] is copy:
                entry[1] = self.seq
        return self.seq

    def host_wait(self, event):
        self.completed = max(self.completed, event)
        self.copies = [e for e in self.copies if e[1] is None or e[1] > self.completed]


def _inputs(seed=7):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 16, 2, 4, 4, generator=g), torch.tensor([500.0]),
            torch.randn(1, 512, CFG.text_dim, generator=g), torch.randn(1, 1028, CFG.image_dim, generator=g)), \
        dict(condition=torch.randn(1, 20, 6, 4, 4, generator=g))


@pytest.mark.parametrize("prefetch", [0, 1, 2])
@pytest.mark.parametrize("resident", [0, 1])
def test_offload_keeps_at_most_prefetch_plus_one_blocks_in_flight(prefetch, resident):
    cfg = PRESETS["tiny"].replace(num_layers=4)
    model = randomize_(build_dit(cfg), seed=8)
    args, kw = _inputs()
    with torch.no_grad():
        ref = model(*args, **kw)
    gpu = FakeGpu()
    offload = enable_block_offload(model, resident_blocks=resident, device="cpu", prefetch_blocks=prefetch,
                                   pin_memory=True, transfers=gpu)
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(model(*args, **kw), ref)
    streamed = 4 - resident
    assert gpu.max_on_device == prefetch + 1  # the whole window is used, never more
    assert offload.uploads == 2 * streamed + prefetch  # block 0 of the next call prefetched at the end
    # one page-locked flat buffer per streamed block, hardly bigger than its tensors
    assert len(gpu.pinned) == streamed and offload.pinned_bytes() == sum(gpu.pinned)
    assert 1.0 <= offload.pinned_bytes() / offload.streamed_bytes() <= 1.05
    block = model.blocks[-1]
    base = offload._storage[3].buffer.data_ptr()
    assert all(base <= t.data_ptr() < base + offload._storage[3].buffer.numel()
               for t in list(block.parameters()) + list(block.buffers()))  # views into that buffer
    disable_block_offload(model)
    with torch.no_grad():
        assert torch.equal(model(*args, **kw), ref)


# ------------------------------------------------------------------------------------------ fp8
def _fp8_reference(w: torch.Tensor):
    """The textbook per-tensor e4m3 quantisation, written out here independently: float32 throughout."""
    scale = (w.float().abs().max() / 448.0).clamp(min=1e-12)
    return (w.float() / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn), scale


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(300, 700), (7,), (1, 1)])
def test_quantize_weight_is_the_float32_formula_bit_for_bit(dtype, shape):
    g = torch.Generator().manual_seed(11)
    w = (torch.randn(shape, generator=g) * 0.05).to(dtype)
    w.view(-1)[0] = -w.abs().max() * 1.5  # the absolute maximum is negative: the scale must see it
    q, scale = FP8.quantize_weight(w)
    ref_q, ref_scale = _fp8_reference(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape and scale.dtype == torch.float32
    assert torch.equal(scale, ref_scale) and torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))
    assert q.float().abs().max() == 448.0  # the largest magnitude lands on e4m3's largest value


def test_fp8_upcast_applies_the_scale_in_float32():
    layer = FP8.FP8Linear(64, 32, device="cpu")
    g = torch.Generator().manual_seed(12)
    layer.weight.data = (torch.randn(32, 64, generator=g) * 3).to(torch.float8_e4m3fn)
    layer.scale_weight = torch.tensor(0.0123456789)  # not representable in bf16: rounding it first is wrong
    exact = layer.weight.double() * 0.0123456789
    got = layer.dequantized_weight(torch.bfloat16)
    assert torch.equal(got, (layer.weight.float() * layer.scale_weight).bfloat16())
    bf16_scaled = layer.weight.bfloat16() * layer.scale_weight.bfloat16()  # the old way, for comparison
    assert (got.double() - exact).abs().max() < (bf16_scaled.double() - exact).abs().max()


def test_activation_scaling_choices_and_fast_accumulation(monkeypatch):
    g = torch.Generator().manual_seed(13)
    weight = torch.randn(96, 64, generator=g) * 0.2
    wq, ws = FP8.quantize_weight(weight)
    monkeypatch.setattr(FP8, "_ACT_CHUNK_ELEMENTS", 64 * 10)  # several row chunks
    x = torch.randn(2, 37, 64, generator=g).bfloat16()
    xq, xs = FP8.quantize_activation(x.reshape(-1, 64))
    ref_q, ref_s = _fp8_reference(x.reshape(-1, 64))
    assert torch.equal(xs, ref_s) and torch.equal(xq.view(torch.uint8), ref_q.view(torch.uint8))

    def err(scale_x, mode, fast=False):
        upcast = torch.nn.functional.linear(scale_x, (wq.float() * ws).bfloat16()).float()
        out = FP8.scaled_mm_linear(scale_x, wq, ws, activation_scale=mode, fast_accum=fast).float()
        return ((out - upcast).pow(2).mean().sqrt() / upcast.pow(2).mean().sqrt()).item()

    for mode in ("dynamic", "static"):
        assert err(x * 3, mode) <= 6e-2
    assert err(x * 3, "dynamic", fast=True) <= 6e-2
    # static scale 1 saturates beyond 448 and loses small values; dynamic scaling keeps both
    assert err(x * 2000, "static") > 0.3 and err(x * 2000, "dynamic") <= 6e-2
    assert err(x * 1e-3, "static") > 0.1 and err(x * 1e-3, "dynamic") <= 6e-2
    model = torch.nn.Sequential(torch.nn.Linear(64, 96))
    FP8.convert_to_fp8(model, ["0"])
    assert FP8.set_fp8_matmul(model, "scaled_mm", activation_scale="static", fast_accum=True) == 1
    assert model[0].activation_scale == "static" and model[0].fast_accum
    with pytest.raises(ValueError, match="dynamic"):
        FP8.set_fp8_matmul(model, "scaled_mm", activation_scale="per_row")


# ------------------------------------------------------------------------------------------ gpu_check
def test_gpu_check_smoke_runs_every_section_on_the_cpu(tmp_path):
    """benchmarks/gpu_check.py --smoke: the GPU check's own code at a tiny width, every section written."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "check.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    proc = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(out)], capture_output=True, text=True,
                          timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sections = json.loads(out.read_text())["sections"]
    assert list(sections) == ["environment", "scaled_mm", "parity", "full", "capped"]
    assert all(s["status"] == "ok" for s in sections.values())
    env = sections["environment"]
    assert env["backends"]["auto"]["runs"] == "sdpa"  # no CUDA here
    assert env["backends"]["sage"]["runs"] == "sdpa" and env["backends"]["sage"]["reason"]
    parity = sections["parity"]
    # on the CPU sage/flash fall back to sdpa, offload and the eager-compiled blocks are exact: one number
    same = {parity[k]["rel_rms"] for k in ("bf16_sdpa", "bf16_sage", "bf16_flash", "bf16_offload_0_resident",
                                            "bf16_compiled_eager")}
    assert len(same) == 1 and 0 < same.pop() < 3e-2
    assert parity["fp8_upcast"]["rel_rms"] < 1e-1
    assert sections["full"]["ratio_to_diffusers"] > 0 and sections["full"]["blocks"] == 3
    rows = [row for row in sections["capped"].values() if isinstance(row, dict)]
    assert len(rows) == 3 and all(row["fits"] for row in rows)

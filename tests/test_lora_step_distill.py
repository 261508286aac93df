"""The step-distill LoRA format (lightx2v_I2V_14B_480p_cfg_step_distill_rank64_bf16.safetensors) on our DiT.

Where the key layout comes from (public code that writes or reads these files):

* ModelTC/LightX2V ``tools/extract/lora_extractor.py`` (commit 29c8504c), which made the file:
  ``_decompose_to_lora`` writes ``diffusion_model.<original name>.lora_up.weight`` / ``.lora_down.weight``
  (no ``.alpha``: scale 1) for 2-D weights of 1M+ elements; ``_generate_lora_diff_key`` writes every
  smaller or 1-D weight as ``<name>.diff`` (norms, the patch embedding), biases as ``<name>.diff_b`` and
  ``<block>.modulation`` as ``<block>.diff_m``;
* diffusers 0.42.1 ``loaders/lora_conversion_utils.py`` ``_convert_non_diffusers_wan_lora_to_diffusers``:
  ``lora_A`` or ``lora_down``, optional ``.alpha`` (scale alpha / rank), ``.diff_b`` on self/cross
  attention q/k/v/o, ``k_img``/``v_img``, ``ffn.0``/``ffn.2``, ``time_projection.1``, ``head.head``,
  ``text_embedding.{0,2}``, ``time_embedding.{0,2}``, ``img_emb.proj.{1,3}``; ``.diff`` on norms;
* ComfyUI ``comfy/lora.py`` ``load_lora`` and ``comfy/weight_adapter/lora.py`` (commit 783545f6):
  ``.diff`` is added to the weight, ``.diff_b`` to the bias, pairs as ``alpha / rank * up @ down``.

The expected weights are written out here by hand, name by name: W + strength * scale * up @ down + diffs.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from bindweave_core.lora import apply_lora, load_lora
from bindweave_core.smoke import smoke_dit

RANK = 4
P = "diffusion_model."
# original (lightx2v) name -> our parameter prefix, per block
BLOCK_LINEARS = {"self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
                 "self_attn.o": "attn1.to_out.0", "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k",
                 "cross_attn.v": "attn2.to_v", "cross_attn.o": "attn2.to_out.0", "cross_attn.k_img": "attn2.add_k_proj",
                 "cross_attn.v_img": "attn2.add_v_proj", "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2"}
BLOCK_NORMS = {"norm3": "norm2", "self_attn.norm_q": "attn1.norm_q", "self_attn.norm_k": "attn1.norm_k",
               "cross_attn.norm_q": "attn2.norm_q", "cross_attn.norm_k": "attn2.norm_k",
               "cross_attn.norm_k_img": "attn2.norm_added_k"}
TOP_LINEARS = {"text_embedding.0": "condition_embedder.text_embedder.linear_1",
               "text_embedding.2": "condition_embedder.text_embedder.linear_2",
               "time_embedding.0": "condition_embedder.time_embedder.linear_1",
               "time_embedding.2": "condition_embedder.time_embedder.linear_2",
               "time_projection.1": "condition_embedder.time_proj",
               "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
               "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2", "head.head": "proj_out"}
TOP_DIFFS = {"img_emb.proj.0": "condition_embedder.image_embedder.norm1",
             "img_emb.proj.4": "condition_embedder.image_embedder.norm2", "patch_embedding": "patch_embedding"}


def synthetic_lora(dit, *, pair_style: str, alpha: float | None, seed: int = 0):
    """A LoRA in the lightx2v layout for ``dit``; returns (stored tensors, expected deltas per our parameter)."""
    g = torch.Generator().manual_seed(seed)
    params = dict(dit.named_parameters())
    down_suffix, up_suffix = {"down-up": (".lora_down.weight", ".lora_up.weight"),
                              "A-B": (".lora_A.weight", ".lora_B.weight")}[pair_style]
    stored: dict[str, torch.Tensor] = {}
    deltas: dict[str, list] = {}  # our parameter -> [("pair", down, up, scale) | ("diff", tensor)]

    def rand(*shape):  # bf16, as the released rank-64 file
        return (torch.randn(*shape, generator=g) * 0.05).to(torch.bfloat16)

    def add_pair(original: str, ours: str):
        out_f, in_f = params[f"{ours}.weight"].shape
        down, up = rand(RANK, in_f), rand(out_f, RANK)
        stored[P + original + down_suffix], stored[P + original + up_suffix] = down, up
        scale = 1.0
        if alpha is not None:
            stored[P + original + ".alpha"] = torch.tensor(alpha)
            scale = alpha / RANK
        deltas.setdefault(f"{ours}.weight", []).append(("pair", down, up, scale))
        bias = rand(out_f)
        stored[P + original + ".diff_b"] = bias
        deltas.setdefault(f"{ours}.bias", []).append(("diff", bias))

    def add_diff(original: str, ours: str, suffix: str = ".diff", leaf: str = "weight"):
        name = f"{ours}.{leaf}" if leaf else ours
        t = rand(*params[name].shape)
        stored[P + original + suffix] = t
        deltas.setdefault(name, []).append(("diff", t))

    for b in range(len(dit.blocks)):
        for original, ours in BLOCK_LINEARS.items():
            add_pair(f"blocks.{b}.{original}", f"blocks.{b}.{ours}")
        for original, ours in BLOCK_NORMS.items():
            add_diff(f"blocks.{b}.{original}", f"blocks.{b}.{ours}")
        add_diff(f"blocks.{b}", f"blocks.{b}.scale_shift_table", ".diff_m", leaf="")  # modulation
    for original, ours in TOP_LINEARS.items():
        add_pair(original, ours)
    for original, ours in TOP_DIFFS.items():
        add_diff(original, ours)
    add_diff("img_emb.proj.0", "condition_embedder.image_embedder.norm1", ".diff_b", leaf="bias")
    add_diff("patch_embedding", "patch_embedding", ".diff_b", leaf="bias")
    add_diff("head", "scale_shift_table", ".diff_m", leaf="")  # head.modulation
    return stored, deltas


@pytest.mark.parametrize("pair_style,alpha", [("down-up", None), ("A-B", 8.0)])
def test_step_distill_lora_equals_the_explicit_weight_sum(tmp_path, pair_style, alpha):
    dit = smoke_dit(0)
    stored, deltas = synthetic_lora(dit, pair_style=pair_style, alpha=alpha)
    path = tmp_path / "lightx2v_I2V_14B_480p_cfg_step_distill_rank64_bf16.safetensors"
    save_file(stored, str(path))
    lora = load_lora(path)
    assert not lora.skipped and lora.source_format == "wan-original"
    before = {n: p.detach().clone() for n, p in dit.named_parameters()}
    strength = 0.75
    applied = apply_lora(dit, lora, strength)
    touched = 0
    for name, p in dit.named_parameters():
        if name not in deltas:
            assert torch.equal(p, before[name]), f"{name} changed but the LoRA does not name it"
            continue
        want = before[name].clone()
        for entry in deltas[name]:
            if entry[0] == "pair":
                _, down, up, scale = entry
                want = want + strength * scale * (up.float() @ down.float())
            else:
                want = want + strength * entry[1].float()
        torch.testing.assert_close(p, want, rtol=0, atol=2e-6, msg=name)
        touched += 1
    assert touched == len(deltas)
    applied.remove()
    for name, p in dit.named_parameters():
        torch.testing.assert_close(p, before[name], rtol=0, atol=1e-6)

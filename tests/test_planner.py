"""The Qwen2.5-VL planner: input sequences against the real hidden states' lengths, the tiny model
against direct transformers calls, single files in ComfyUI's key names (plain and fp8 scaled), the
disk cache and prompt refinement."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from bindweave_core import constants as C
from bindweave_core.checkpoints.safetensors_io import TensorInfo
from bindweave_core.checkpoints.writers import save_sharded
from bindweave_core.config import PRESETS
from bindweave_core.encoders.planner import (
    QWEN25_VL_7B_CONFIG,
    QWEN25_VL_7B_IMAGE_SETTINGS,
    TINY_CONFIG,
    ImageSettings,
    Planner,
    build_inputs,
    inspect_report,
    make_processor,
    pre_resize,
    prepare_images,
    tiny_tokenizer,
)
from bindweave_core.errors import CheckpointError, InputError
from bindweave_core.fp8 import FP8Linear
from bindweave_core.inspection import inspect_checkpoint
from helpers import QWEN_TOKENIZER, REPO, SAMPLES, need

# Qwen/Qwen2.5-VL-7B-Instruct's preprocessor_config.json, as released.
REAL_PREPROCESSOR = {
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2_5_VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
}
PREFIX = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"
# (case, negative?, real states file, length, vision tokens per image)
REAL_CASES = [
    ("singleface_1", False, "singleface_hidden_states.safetensors", 526, [396]),
    ("singleface_1", True, "singleface_hidden_states_negative.safetensors", 532, [396]),
    ("multihuman_14", True, "multihuman_hidden_states_negative.safetensors", 490, [176, 176]),
]


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def real_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(need(QWEN_TOKENIZER)))


@pytest.fixture(scope="module")
def real_processor(real_tokenizer):
    return make_processor(real_tokenizer, ImageSettings.from_preprocessor_config(REAL_PREPROCESSOR))


@pytest.fixture(scope="module")
def tiny():
    return Planner.tiny(seed=0)


@pytest.fixture(scope="module")
def tiny_tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_tokenizer")
    tiny_tokenizer().save_pretrained(str(d))
    return d


def real_states(file_name: str) -> dict:
    """A real Qwen2.5-VL hidden-state file as shipped in tests/data: its shape (metadata), first tokens, per-token RMS."""
    from safetensors import safe_open

    with safe_open(str(need(SAMPLES / "hidden_states" / file_name)), "pt") as f:
        meta = f.metadata()
        return {"shape": tuple(int(n) for n in meta["shape"].split(",")), "head": f.get_tensor("head"),
                "token_rms": f.get_tensor("token_rms")}


def case(name: str) -> dict:
    return json.loads((need(SAMPLES / "test_case.json")).read_text())[name]


def case_images(name: str) -> list[Image.Image]:
    return [Image.open(need(SAMPLES / "images" / p.split("/")[-1])) for p in case(name)["img_paths"]]


def small_images(n: int = 2, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [(120, 90), (60, 60), (80, 100), (70, 50), (64, 64)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes[:n]]


# ------------------------------------------------------------------------------------------ real sequences
def test_image_settings_are_the_released_ones():
    assert QWEN25_VL_7B_IMAGE_SETTINGS == ImageSettings.from_preprocessor_config(REAL_PREPROCESSOR)


@pytest.mark.parametrize("name,negative,states_file,length,vision", REAL_CASES)
def test_real_sequence_lengths_match_real_states(real_processor, name, negative, states_file, length, vision):
    real = real_states(states_file)
    assert real["shape"] == (1, length, C.PLANNER_DIM)
    prompt = C.DEFAULT_PLANNER_NEGATIVE_PROMPT if negative else case(name)["prompt"]
    batch = build_inputs(real_processor, prompt, prepare_images(case_images(name)))
    assert batch["input_ids"].shape == (1, length)
    assert batch["attention_mask"].sum() == length
    grids = batch["image_grid_thw"]
    assert [int(g.prod()) // 4 for g in grids] == vision
    assert batch["pixel_values"].shape == (sum(vision) * 4, 3 * 2 * 14 * 14)


@pytest.mark.parametrize("name,negative,states_file,length,vision", REAL_CASES)
def test_real_sequence_is_text_then_images(real_tokenizer, real_processor, name, negative, states_file, length,
                                           vision):
    prompt = C.DEFAULT_PLANNER_NEGATIVE_PROMPT if negative else case(name)["prompt"]
    batch = build_inputs(real_processor, prompt, prepare_images(case_images(name)))
    ids = real_tokenizer
    vs, ve, pad = (ids.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>"))
    expected = ids(PREFIX).input_ids + ids(prompt).input_ids
    for n in vision:
        expected += [vs] + [pad] * n + [ve]
    expected += ids(SUFFIX).input_ids
    assert batch["input_ids"][0].tolist() == expected


def test_large_image_uses_the_model_limits(real_processor):
    # dog.jpg (4868x3244) after the 0.3 resize: 1,820 vision tokens with the model's max_pixels,
    # 1,247 with transformers' generic default cap (spec section 2).
    dog = Image.open(need(SAMPLES / "images" / "dog.jpg"))
    batch = build_inputs(real_processor, "a dog", prepare_images([dog]))
    assert int(batch["image_grid_thw"][0].prod()) // 4 == 1820


# ------------------------------------------------------------------------------------------ resizing
@pytest.mark.parametrize("name", ["dog.jpg", "human.jpg", "man.png", "school.jpg", "woman1.jpg", "woman2.jpg"])
def test_pre_resize_follows_the_spec(name):
    image = Image.open(need(SAMPLES / "images" / name))
    w, h = image.size
    s = 0.75 if w * h <= 1280 * 720 else 0.3
    expected = (int(w * s), int(h * s))
    out = pre_resize(image)
    assert out.size == expected and out.mode == "RGB"
    assert np.array_equal(np.asarray(out), np.asarray(image.convert("RGB").resize(expected)))


@pytest.mark.parametrize("name", ["man.png", "woman1.jpg"])
def test_grid_fit_matches_the_processor_resize_on_ordinary_images(real_processor, name):
    """The official path resized to the 28-pixel grid before the processor; for ordinary images the
    processor's own resize gives the same pixels, so both orders agree exactly."""
    image = Image.open(need(SAMPLES / "images" / name))
    ours = build_inputs(real_processor, "x", prepare_images([image]))
    processor_only = build_inputs(real_processor, "x", [pre_resize(image)])
    assert torch.equal(ours["image_grid_thw"], processor_only["image_grid_thw"])
    assert torch.equal(ours["pixel_values"], processor_only["pixel_values"])


def test_thin_image_gets_the_official_grid(tiny):
    # 10x300 -> pre-resize 7x225 -> official rule: width max(28, round(7/28)*28) = 28, height
    # round(225/28)*28 = 224; 28*224 >= 3136 so it stays: grid 16 x 2 patches -> 8 tokens.
    # (transformers' own smart_resize would give 28 x 336 here.)
    img = Image.fromarray(np.full((300, 10, 3), 128, dtype=np.uint8))
    batch = tiny.input_sequence("a thin pole", [img])
    assert batch["image_grid_thw"].tolist() == [[1, 16, 2]]
    assert (batch["input_ids"] == TINY_CONFIG["image_token_id"]).sum() == 8


def test_too_elongated_image_is_refused(tiny):
    img = Image.fromarray(np.zeros((4, 1200, 3), dtype=np.uint8))
    with pytest.raises(InputError, match="elongated"):
        tiny.input_sequence("x", [img])


# ------------------------------------------------------------------------------------------ tiny model
def test_tiny_planner_shape(tiny):
    # (about 0.05 s per encode on one idle CPU core; not asserted: shared CI cores make timings flaky)
    assert tiny.hidden_size == PRESETS["tiny"].planner_dim == 64
    assert len(tiny.model.model.language_model.layers) == 2 and len(tiny.model.model.visual.blocks) == 2
    states = tiny.encode("A dog runs.", small_images(2))
    assert states.positive.shape[:2] == (1, tiny.input_sequence("A dog runs.", small_images(2))["input_ids"].shape[1])
    assert states.positive.shape[2] == 64 and states.positive.dtype == tiny.dtype


def test_tiny_is_deterministic():
    a, b = Planner.tiny(seed=3), Planner.tiny(seed=3)
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    c = Planner.tiny(seed=4)
    assert not torch.equal(a.model.lm_head.weight, c.model.lm_head.weight)


def test_hidden_states_are_the_final_normed_states(tiny):
    """Against a direct call of the whole transformers model: its hidden_states[-1], and an explicit
    RMSNorm (computed here) of the input the final norm received."""
    prompt, images = "Two cats play with a red ball.", small_images(2)
    ours = tiny.hidden_states(prompt, images)
    batch = tiny.input_sequence(prompt, images)
    captured = {}
    norm = tiny.model.model.language_model.norm

    def keep_input(module, args, output):
        captured["x"] = args[0]  # returns None: the output is left alone

    handle = norm.register_forward_hook(keep_input)
    try:
        with torch.no_grad():
            out = tiny.model(**batch, output_hidden_states=True)
    finally:
        handle.remove()
    x = captured["x"].float()
    eps = TINY_CONFIG["rms_norm_eps"]
    explicit = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
    assert ours.shape == (1, batch["input_ids"].shape[1], 64)
    torch.testing.assert_close(ours, explicit, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours, out.hidden_states[-1], rtol=0, atol=0)


def test_negative_branch_sees_the_same_images(tiny):
    seen = []
    handle = tiny.model.model.visual.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    try:
        states = tiny.encode("A dog runs.", small_images(3), negative_prompt="blurry")
    finally:
        handle.remove()
    assert len(seen) == 2 and torch.equal(seen[0], seen[1])
    neg_len = tiny.input_sequence("blurry", small_images(3))["input_ids"].shape[1]
    assert states.negative.shape[1] == neg_len != states.positive.shape[1]
    torch.testing.assert_close(states.negative, tiny.hidden_states("blurry", small_images(3)))


def test_default_negative_is_the_planner_one(tiny):
    states = tiny.encode("A dog runs.", small_images(1))
    torch.testing.assert_close(states.negative, tiny.hidden_states(C.DEFAULT_PLANNER_NEGATIVE_PROMPT, small_images(1)))


def test_inputs_are_validated(tiny):
    with pytest.raises(InputError, match="5 reference images given; BindWeave takes 1 to 4"):
        tiny.encode("x", small_images(5))
    with pytest.raises(InputError):
        tiny.encode("x", [])
    with pytest.raises(InputError, match="empty"):
        tiny.encode("   ", small_images(1))
    with pytest.raises(InputError, match="PIL"):
        tiny.encode("x", [np.zeros((32, 32, 3), dtype=np.uint8)])
    with pytest.raises(InputError, match="vision tokens"):
        tiny.encode("x <|image_pad|>", small_images(1))


# ------------------------------------------------------------------------------------------ files
def comfy_key(key: str) -> str:
    """transformers module key -> the names in ComfyUI's qwen_2.5_vl_7b*.safetensors (= the HF shards)."""
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    if key.startswith("model.visual."):
        return "visual." + key[len("model.visual."):]
    return key


def is_quantised(stored_key: str) -> bool:
    return stored_key.endswith("_proj.weight") and stored_key.startswith("model.layers.") or (
        stored_key.startswith("visual.blocks.") and stored_key.endswith(("qkv.weight", "attn.proj.weight",
                                                                         "_proj.weight")))


def comfy_state_dict(planner: Planner, lm_head: bool = True) -> dict[str, torch.Tensor]:
    sd = {comfy_key(k): v.detach().clone() for k, v in planner.model.state_dict().items()}
    if not lm_head:
        del sd["lm_head.weight"]
    return sd


def to_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = w.abs().max().float() / 448.0
    return (w.float() / scale).to(torch.float8_e4m3fn), scale


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny):
    d = tmp_path_factory.mktemp("planner_files")
    plain = d / "qwen_2.5_vl_7b.safetensors"
    save_file(comfy_state_dict(tiny), str(plain))
    headless = d / "qwen_2.5_vl_7b_no_head.safetensors"
    save_file(comfy_state_dict(tiny, lm_head=False), str(headless))
    sd, dequantised = {}, {}
    for k, v in comfy_state_dict(tiny).items():
        if is_quantised(k):
            q, s = to_fp8(v)
            sd[k], sd[k[: -len("weight")] + "scale_weight"] = q, s
            dequantised[k] = q.float() * s
        else:
            sd[k] = v
    sd["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    fp8 = d / "qwen_2.5_vl_7b_fp8_scaled.safetensors"
    save_file(sd, str(fp8))
    return {"plain": plain, "headless": headless, "fp8": fp8, "dequantised": dequantised}


def test_single_file_loads_like_the_model(files, tiny, tiny_tok_dir):
    loaded = Planner.load(files["plain"], dtype=torch.float32, tokenizer_dir=tiny_tok_dir, config=TINY_CONFIG)
    assert loaded.has_lm_head
    prompt, images = "A girl rides a bike.", small_images(2)
    torch.testing.assert_close(loaded.hidden_states(prompt, images), tiny.hidden_states(prompt, images),
                               rtol=0, atol=0)
    bf16 = Planner.load(files["plain"], dtype=torch.bfloat16, tokenizer_dir=tiny_tok_dir, config=TINY_CONFIG)
    out = bf16.hidden_states(prompt, images)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), tiny.hidden_states(prompt, images), rtol=0.1, atol=0.15)


@pytest.mark.parametrize("style", ["wrapped", "transformers-v5"])
def test_other_key_namings_load(tmp_path, tiny, tiny_tok_dir, style):
    sd = tiny.model.state_dict()
    if style == "wrapped":  # a whole text encoder saved from ComfyUI: qwen25_7b.transformer.<names>
        sd = {"qwen25_7b.transformer." + comfy_key(k): v for k, v in sd.items()}
        sd["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)  # marker outside the wrapper
    f = tmp_path / "planner.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(f))
    loaded = Planner.load(f, dtype=torch.float32, tokenizer_dir=tiny_tok_dir, config=TINY_CONFIG)
    torch.testing.assert_close(loaded.hidden_states("x", small_images(1)), tiny.hidden_states("x", small_images(1)),
                               rtol=0, atol=0)


def test_harmless_extras_are_silent_and_unknown_ones_warned(tmp_path, tiny, tiny_tok_dir, caplog):
    """ComfyUI single files may carry activation scales (``scale_input``) and persisted buffers; names from
    yzkee/ComfyUI @ 783545f689a0af730065994b46b382ae24844c99 comfy/utils.py convert_old_quants."""
    sd = comfy_state_dict(tiny)
    sd["model.layers.0.self_attn.q_proj.scale_input"] = torch.ones(())
    sd["visual.blocks.0.attn.extra_gate.weight"] = torch.zeros(2)
    f = tmp_path / "planner.safetensors"
    save_file(sd, str(f))
    loaded = Planner.load(f, dtype=torch.float32, tokenizer_dir=tiny_tok_dir, config=TINY_CONFIG)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "unexpected" in r.getMessage()]
    assert len(warnings) == 1 and "visual.blocks.0.attn.extra_gate.weight" in warnings[0]
    assert "scale_input" not in warnings[0]
    torch.testing.assert_close(loaded.hidden_states("x", small_images(1)), tiny.hidden_states("x", small_images(1)),
                               rtol=0, atol=0)
    sd["model.layers.1.mlp.up_proj.weight"] = sd["model.layers.1.mlp.up_proj.weight"][:, :8].contiguous()
    save_file(sd, str(f))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight: file \[\d+, 8\], model"):
        Planner.load(f, dtype=torch.float32, tokenizer_dir=tiny_tok_dir, config=TINY_CONFIG)


def test_fp8_scaled_file_is_dequantised(files, tiny_tok_dir):
    reference = Planner.tiny(seed=0)
    names = {comfy_key(k): k for k in reference.model.state_dict()}
    reference.model.load_state_dict({**reference.model.state_dict(),
                                     **{names[k]: v for k, v in files["dequantised"].items()}})
    prompt, images = "A girl rides a bike.", small_images(2)
    expected = reference.hidden_states(prompt, images)
    loaded = Planner.load(files["fp8"], dtype=torch.float32, tokenizer_dir=tiny_tok_dir, config=TINY_CONFIG)
    assert loaded.checkpoint_info.fp8_scaled
    torch.testing.assert_close(loaded.hidden_states(prompt, images), expected, rtol=1e-5, atol=1e-5)
    kept = Planner.load(files["fp8"], dtype=torch.float32, tokenizer_dir=tiny_tok_dir, config=TINY_CONFIG,
                        weight_format="fp8")
    q_proj = kept.model.model.language_model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, FP8Linear) and q_proj.weight.dtype == torch.float8_e4m3fn
    torch.testing.assert_close(kept.hidden_states(prompt, images), expected, rtol=1e-5, atol=1e-5)


def test_file_without_lm_head_encodes_but_cannot_refine(files, tiny, tiny_tok_dir):
    loaded = Planner.load(files["headless"], dtype=torch.float32, tokenizer_dir=tiny_tok_dir, config=TINY_CONFIG)
    assert not loaded.has_lm_head
    torch.testing.assert_close(loaded.hidden_states("x", small_images(1)), tiny.hidden_states("x", small_images(1)))
    with pytest.raises(CheckpointError, match="LM head"):
        loaded.refine_prompt("x", small_images(1), max_new_tokens=2)


def test_hf_directory_loads_with_its_own_settings(tmp_path, tiny):
    d = tmp_path / "Qwen2.5-VL-tiny"
    save_sharded(comfy_state_dict(tiny), d, prefix="model", max_shard_bytes=200_000)
    assert len(list(d.glob("model-*.safetensors"))) > 1
    (d / "config.json").write_text(json.dumps(TINY_CONFIG))
    (d / "preprocessor_config.json").write_text(json.dumps({**REAL_PREPROCESSOR, "max_pixels": 28 * 28 * 16}))
    tiny_tokenizer().save_pretrained(str(d))
    loaded = Planner.load(d, dtype=torch.float32)
    prompt, images = "A dog runs.", small_images(2)
    torch.testing.assert_close(loaded.hidden_states(prompt, images), tiny.hidden_states(prompt, images),
                               rtol=0, atol=0)
    big = Image.fromarray(np.zeros((600, 800, 3), dtype=np.uint8))  # 600x450 after pre-resize
    grid = loaded.input_sequence("x", [big])["image_grid_thw"][0]
    assert int(grid.prod()) * 14 * 14 <= 28 * 28 * 16  # the directory's max_pixels, not the 7B default
    assert int(tiny.input_sequence("x", [big])["image_grid_thw"][0].prod()) * 14 * 14 > 28 * 28 * 16


def test_wrong_and_missing_files_say_what_to_do(tmp_path, files, tiny_tok_dir):
    with pytest.raises(CheckpointError, match="qwen_2.5_vl_7b"):
        Planner.load(tmp_path / "absent.safetensors")
    dit = tmp_path / "wan.safetensors"
    save_file({"blocks.0.self_attn.q.weight": torch.zeros(4, 4), "patch_embedding.weight": torch.zeros(4, 4)}, str(dit))
    with pytest.raises(CheckpointError, match=r"looks like a Wan DiT.*qwen_2\.5_vl_7b"):
        Planner.load(dit)
    sd = {k: v for k, v in comfy_state_dict(Planner.tiny()).items() if "layers.1.mlp.down_proj" not in k}
    broken = tmp_path / "broken.safetensors"
    save_file(sd, str(broken))
    with pytest.raises(CheckpointError, match=r"missing 1 keys: model\.language_model\.layers\.1\.mlp\.down_proj"):
        Planner.load(broken, tokenizer_dir=tiny_tok_dir, config=TINY_CONFIG)
    weights_only = tmp_path / "Qwen2.5-VL-7B-Instruct"
    weights_only.mkdir()
    save_file(comfy_state_dict(Planner.tiny()), str(weights_only / "model.safetensors"))
    with pytest.raises(CheckpointError, match="config.json is missing"):
        Planner.load(weights_only)
    with pytest.raises(CheckpointError, match="qwen25_tokenizer"):
        Planner.load(files["plain"], config=TINY_CONFIG)  # no tokenizer beside the file
    # the released-7B config against a tiny file: shapes are checked before anything is loaded
    with pytest.raises(CheckpointError, match="shape mismatch.*Qwen2.5-VL-7B-Instruct"):
        Planner.load(files["plain"], tokenizer_dir=tiny_tok_dir)


def test_tokenizer_must_match_the_model(files):
    with pytest.raises(CheckpointError, match="does not belong"):
        Planner.load(files["plain"], tokenizer_dir=need(QWEN_TOKENIZER), config=TINY_CONFIG)


def test_inspect_recognises_planner_files(files):
    report = inspect_checkpoint(files["fp8"])
    assert report["kind"] == "qwen2.5-vl" and report["fp8_scaled"] and report["lm_head"]
    assert any("shape mismatch" in p for p in report["problems"])  # a toy file is not the 7B model
    out = subprocess.run([sys.executable, "-m", "bindweave_core", "inspect", str(files["plain"]), "--json"],
                         check=False, cwd=REPO, capture_output=True, text=True, timeout=120)
    cli = json.loads(out.stdout)
    assert cli["kind"] == "qwen2.5-vl" and not cli["fp8_scaled"]
    assert "single-file" in cli["layout"]


def qwen25_vl_7b_parameters() -> int:
    """Qwen2.5-VL-7B-Instruct's parameter count from its published architecture."""
    d, ffn, vocab, kv = 3584, 18944, 152064, 512
    layer = (d * d + d) + 2 * (kv * d + kv) + d * d + 3 * d * ffn + 2 * d
    lm = vocab * d + 28 * layer + d + vocab * d  # embeddings, layers, final norm, lm_head
    v, vffn = 1280, 3420
    block = 2 * v + (3 * v * v + 3 * v) + (v * v + v) + 2 * (vffn * v + vffn) + (v * vffn + v)
    vision = v * 3 * 2 * 14 * 14 + 32 * block + v + (4 * v * 4 * v + 4 * v) + (d * 4 * v + d)
    return lm + vision


def released_7b_infos(tmp_path, fp8: bool, lm_head: bool = True) -> dict[str, TensorInfo]:
    """Headers of a ComfyUI-named 7B single file (no data): every tensor of the real architecture."""
    from accelerate import init_empty_weights
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    with init_empty_weights():
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**QWEN25_VL_7B_CONFIG))
    file = tmp_path / "qwen_2.5_vl_7b.safetensors"
    infos = {}
    for k, v in model.state_dict().items():
        name = comfy_key(k)
        if name == "lm_head.weight" and not lm_head:
            continue
        quant = fp8 and is_quantised(name)
        infos[name] = TensorInfo(file, name, torch.float8_e4m3fn if quant else torch.bfloat16, tuple(v.shape))
        if quant:
            scale = name[: -len("weight")] + "scale_weight"
            infos[scale] = TensorInfo(file, scale, torch.float32, ())
    if fp8:
        infos["scaled_fp8"] = TensorInfo(file, "scaled_fp8", torch.float8_e4m3fn, (0,))
    return infos


@pytest.mark.parametrize("fp8,lm_head", [(False, True), (True, True), (True, False)])
def test_released_7b_key_layout_is_complete(tmp_path, fp8, lm_head):
    report = inspect_report(tmp_path / "qwen_2.5_vl_7b.safetensors", released_7b_infos(tmp_path, fp8, lm_head), {})
    assert report["problems"] == []
    assert report["family"] == "qwen2.5-vl-7b" and report["fp8_scaled"] == fp8 and report["lm_head"] == lm_head
    assert report["parameters"] == qwen25_vl_7b_parameters() - (0 if lm_head else 152064 * 3584)
    assert report["config"]["num_layers"] == 28 and report["config"]["vision_layers"] == 32


# ------------------------------------------------------------------------------------------ refinement
def test_refinement_greedy_and_seeded(tiny):
    images = small_images(2)
    a = tiny.refine_prompt("a dog", images, max_new_tokens=12)
    b = tiny.refine_prompt("a dog", images, max_new_tokens=12)
    assert isinstance(a, str) and a and a == b
    state = torch.get_rng_state()
    s1 = tiny.refine_prompt("a dog", images, do_sample=True, seed=7, max_new_tokens=12)
    assert torch.equal(state, torch.get_rng_state())  # seeded sampling leaves the global RNG alone
    s2 = tiny.refine_prompt("a dog", images, do_sample=True, seed=7, max_new_tokens=12)
    s3 = tiny.refine_prompt("a dog", images, do_sample=True, seed=8, max_new_tokens=12)
    assert s1 == s2 and s1 != s3

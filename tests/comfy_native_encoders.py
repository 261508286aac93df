"""Run by tests/test_comfyui_e2e.py with ComfyUI's interpreter, inside ComfyUI's folder:
``python comfy_native_encoders.py REPO WORKDIR``.

ComfyUI's loaders build the released model sizes only (its configs are fixed), so a tiny test file cannot
go through Load CLIP / Load CLIP Vision. Here ComfyUI's own model classes are built at a tiny size, loaded
with the tensors of a tiny test file as ComfyUI's loaders load them, and our encoders made from them
(nodes/native_inputs.py) are compared with our own loaders on the same file (fp32, <= 1e-5); and
ComfyUI's Qwen2.5-VL-7B CLIP, built at its real size on the meta device, maps onto our planner's keys.
Prints one line per check and ``ok`` at the end.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

if __name__ == "__main__":  # as a script: ComfyUI's arguments first (a test node pack imports the builders only)
    repo, work = sys.argv[1], Path(sys.argv[2])
    # fp32 text encoders: the nodes' "auto" precision on the CPU, whether it reads ComfyUI's text-encoder dtype
    # (fp16 on the CPU unless told) or is fp32 on the CPU; our fp32 loads are the reference
    sys.argv = [sys.argv[0], "--cpu", "--fp32-text-enc"]
    import comfy.options

    comfy.options.enable_args_parsing()
    sys.path.insert(0, repo)
    sys.path.insert(0, str(Path(repo) / "tests"))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

ATOL = 1e-5


def node_result(name: str, **inputs):
    from nodes import comfy_nodes

    return getattr(comfy_nodes, name).execute(**inputs).args


def hosted(encoder, kind: str):
    from nodes import host

    return host.wrap(encoder, kind)


def close(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    diff = (a.float() - b.float()).abs().max().item()
    print(f"{name}: max |diff| {diff:.2e} (values up to {b.abs().max().item():.2f})")
    assert a.shape == b.shape and diff <= ATOL, (name, a.shape, b.shape, diff)


def write_tiny_clip_vision(path: Path) -> None:
    """The tiny smoke CLIP vision tower as a ComfyUI-style file (Hugging Face names, fp16 like clip_vision_h)."""
    from bindweave_core.encoders.clip_vision import ClipVisionEncoder

    tiny = ClipVisionEncoder.tiny(0)
    sd = {("" if k.startswith("vision_model.") else "vision_model.") + k: v.half().contiguous()
          for k, v in tiny.model.state_dict().items() if not k.endswith("position_ids")}
    sd["visual_projection.weight"] = torch.full((8, tiny.model.config.hidden_size), 0.01, dtype=torch.float16)
    save_file(sd, str(path))


def comfy_clip_vision(path: Path):
    """ComfyUI's ClipVisionModel at the tiny tower's size, loaded from ``path`` as its CLIPVisionLoader loads."""
    import comfy.clip_vision
    import comfy.utils

    from bindweave_core.encoders.clip_vision import ClipVisionEncoder

    cfg = ClipVisionEncoder.tiny(0).model.config
    config = dict(
        model_type="clip_vision_model", hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads, image_size=224,
        patch_size=14, num_channels=3, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=8)
    json_config = Path(path).with_name(Path(path).stem + "_config.json")  # ComfyUI 0.3.64 takes only a file
    json_config.write_text(json.dumps(config))
    native = comfy.clip_vision.ClipVisionModel(str(json_config))
    missing, _ = native.load_sd(comfy.utils.load_torch_file(str(path)))
    assert not missing, missing
    return native


def check_clip_vision() -> None:
    """ComfyUI's ClipVisionModel (tiny config) holding a tiny fp16 file (as clip_vision_h is fp16)."""
    from bindweave_core.encoders.clip_vision import ClipVisionEncoder
    from nodes.native_inputs import clip_vision_from_native

    path = work / "tiny_clip_vision.safetensors"
    write_tiny_clip_vision(path)
    native = comfy_clip_vision(path)
    canvases = torch.rand(2, 48, 64, 3, generator=torch.Generator().manual_seed(1))
    ours = clip_vision_from_native(native, torch.float32).encode_references(canvases)
    close("CLIP vision, ComfyUI's model vs our loader", ours,
          ClipVisionEncoder.load(path, dtype=torch.float32).encode_references(canvases))
    from nodes.comfy_nodes import ours

    assert isinstance(ours(native, "clip_vision").component, ClipVisionEncoder)  # what Reference Encode makes of it
    assert ours(native, "clip_vision") is ours(native, "clip_vision")  # made once per ComfyUI model
    native.model.half()  # as ComfyUI holds clip_vision_h by default (fp16); our code in that precision shares them
    shared = clip_vision_from_native(native, torch.float16)
    weight = native.model.state_dict()["vision_model.embeddings.patch_embedding.weight"]
    assert shared.model.embeddings.patch_embedding.weight.data_ptr() == weight.data_ptr()
    print("CLIP vision: same tensors as ComfyUI's model in its precision")


def _spiece() -> bytes:
    import sentencepiece as spm
    from test_text_encoder import CORPUS as corpus

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=buf, vocab_size=48,
                                   model_type="unigram", num_threads=1, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
                                   minloglevel=2)
    return buf.getvalue()


UMT5_SIZES = dict(vocab_size=384, d_kv=8, d_ff=64, num_layers=2, num_heads=4)  # vocabulary: spiece + 300 extra ids


def write_tiny_umt5(path: Path) -> None:
    """A tiny UMT5 (the smoke DiT's text width) with its sentencepiece model, as umt5_xxl_fp16.safetensors."""
    from bindweave_core.config import PRESETS
    from bindweave_core.encoders.base import seeded_init_
    from bindweave_core.encoders.text import UMT5_XXL_CONFIG, build_model

    tiny = build_model(dict(UMT5_XXL_CONFIG, d_model=PRESETS["tiny"].text_dim, dropout_rate=0.0, **UMT5_SIZES),
                       device="cpu")
    seeded_init_(tiny, 0, lambda name, p, noise: (1.0 if "layer_norm" in name else 0.0) + 0.2 * noise)
    sd = {k: v.half().contiguous() for k, v in tiny.state_dict().items() if k != "encoder.embed_tokens.weight"}
    sd["spiece_model"] = torch.frombuffer(bytearray(_spiece()), dtype=torch.uint8)
    save_file(sd, str(path))


def write_tiny_umt5_fp8_scaled(source: Path, path: Path) -> None:
    """``source`` as ComfyUI's umt5_xxl_fp8_e4m3fn_scaled files are: linear weights in fp8 e4m3 with a per-tensor
    ``scale_weight``, the rest in fp16, and the ``scaled_fp8`` marker."""
    from safetensors.torch import load_file

    sd = {}
    for k, v in load_file(str(source)).items():
        if k.endswith(".weight") and (".SelfAttention." in k or ".DenseReluDense." in k) and "relative" not in k:
            scale = v.float().abs().amax() / 448.0
            sd[k], sd[k[: -len("weight")] + "scale_weight"] = (v.float() / scale).to(torch.float8_e4m3fn), scale
        else:
            sd[k] = v
    sd["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_file(sd, str(path))


def comfy_umt5_clip(path: Path):
    """ComfyUI's CLIP with its UMT5 model (T5 class, the file's tiny sizes), loaded as its CLIPLoader (type wan)
    loads: the file's dtype, the sentencepiece model as the tokenizer's data."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base
    import comfy.text_encoders.t5
    import comfy.text_encoders.wan
    import comfy.utils

    stored = comfy.utils.load_torch_file(str(path))
    stored, _ = comfy.utils.convert_old_quants(stored, "", metadata={})  # as Load CLIP: scaled fp8 -> its quant ops
    quant = comfy.utils.detect_layer_quantization(stored, "")
    d_model = stored["shared.weight"].shape[1]
    config = {**UMT5_SIZES, "d_model": d_model, "dense_act_fn": "gelu_pytorch_tanh", "is_gated_act": True,
              "layer_norm_epsilon": 1e-6, "model_type": "umt5", "relative_attention_num_buckets": 32,
              "relative_attention_max_distance": 128}

    class TinyUMT5(comfy.sd1_clip.SDClipModel):  # ComfyUI's UMT5XXlModel with a tiny config instead of the XXL one
        def __init__(self, device="cpu", layer="last", layer_idx=None, dtype=None, model_options={}):  # noqa: B006
            super().__init__(device=device, layer=layer, layer_idx=layer_idx, textmodel_json_config=config,
                             dtype=dtype, special_tokens={"end": 1, "pad": 0}, model_class=comfy.text_encoders.t5.T5,
                             enable_attention_masks=True, zero_out_masked=True, model_options=model_options)

    class TinyWan(comfy.sd1_clip.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):  # noqa: B006
            super().__init__(device=device, dtype=dtype, model_options=model_options, name="umt5xxl",
                             clip_model=TinyUMT5, **kwargs)

    target = comfy.supported_models_base.ClipTarget(comfy.text_encoders.wan.WanT5Tokenizer, TinyWan)
    spiece = stored.pop("spiece_model")
    clip = comfy.sd.CLIP(target, tokenizer_data={"spiece_model": spiece}, state_dict=[stored],  # loaded as Load CLIP
                         model_options={"dtype": stored["encoder.final_layer_norm.weight"].dtype,
                                        **({"quantization_metadata": quant} if quant else {})})
    return clip


def check_umt5() -> None:
    """ComfyUI's CLIP with its UMT5 model (T5 class, tiny config), loaded from a tiny umt5_xxl_fp16-style file."""
    from bindweave_core.encoders.text import TextEncoder
    from nodes.native_inputs import text_encoder_from_native

    path = work / "tiny_umt5_fp16.safetensors"
    write_tiny_umt5(path)
    clip = comfy_umt5_clip(path)
    prompts = ["a man walks a dog in the park", "static blurred video"]
    mine = TextEncoder.load(path, dtype=torch.float32)
    close("UMT5, ComfyUI's CLIP vs our loader", text_encoder_from_native(clip, torch.float32).encode(prompts),
          mine.encode(prompts))
    # the node: UMT5 Encode on ComfyUI's CLIP (our auto precision) and on our loader's encoder
    a = node_result("TextEncode", text_encoder=clip, prompt=prompts[0], negative_prompt=prompts[1])[0]
    b = node_result("TextEncode", text_encoder=hosted(mine, "text_encoder"), prompt=prompts[0],
                    negative_prompt=prompts[1])[0]
    close("UMT5 Encode node, ComfyUI's CLIP vs our loader", a.positive, b.positive)
    fp8 = work / "tiny_umt5_fp8_e4m3fn_scaled.safetensors"  # ComfyUI holds these in its quantised layers
    write_tiny_umt5_fp8_scaled(path, fp8)
    clip = comfy_umt5_clip(fp8)
    held = type(clip.cond_stage_model.umt5xxl.transformer.encoder.block[0].layer[0].SelfAttention.q.weight).__name__
    close(f"UMT5 fp8 scaled ({held} in ComfyUI), ComfyUI's CLIP vs our loader",
          text_encoder_from_native(clip, torch.float32).encode(prompts),
          TextEncoder.load(fp8, dtype=torch.float32).encode(prompts))


def check_qwen_keys() -> None:
    """ComfyUI's Qwen2.5-VL-7B CLIP (type qwen_image) at its real size on the meta device: every tensor of its
    state dict, prefix removed, is a tensor our planner loader expects, and nothing is missing but the head."""
    import comfy.ops
    import comfy.text_encoders.qwen_image

    from bindweave_core.checkpoints.tensor_info import TensorInfo
    from bindweave_core.encoders.planner_checkpoint import scan_planner

    with torch.device("meta"):
        te = comfy.text_encoders.qwen_image.QwenImageTEModel(device="meta", dtype=torch.bfloat16)
    prefix = "qwen25_7b.transformer."
    infos = {k[len(prefix):]: TensorInfo(Path("meta"), k[len(prefix):], v.dtype, tuple(v.shape))
             for k, v in te.state_dict().items() if k.startswith(prefix)}
    ckpt = scan_planner(Path("comfyui-qwen25-7b"), infos=infos, metadata={})
    assert not ckpt.problems(), ckpt.problems()
    assert not ckpt.has_lm_head
    print(f"Qwen2.5-VL-7B: ComfyUI's {len(infos)} tensors map onto our planner's keys (no LM head)")


def check_planner(tok_dir: str) -> None:
    """Our planner over a Qwen CLIP holding a tiny model's tensors under ComfyUI's names equals our loader on
    the file (ComfyUI's class cannot be built tiny: its vision tower's width is fixed; the names are
    checked at full size above)."""
    from test_planner import comfy_state_dict

    from bindweave_core.encoders.planner import Planner
    from bindweave_core.encoders.planner_config import TINY_CONFIG
    from nodes.native_inputs import planner_from_native

    tiny = Planner.tiny(0)
    sd = {k: v for k, v in comfy_state_dict(tiny).items() if k != "lm_head.weight"}  # ComfyUI drops the head
    path = work / "tiny_qwen.safetensors"
    save_file(sd, str(path))

    class Held(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qwen25_7b = torch.nn.Module()

    class QwenClip:  # the parts of comfy.sd.CLIP our conversion reads
        cond_stage_model = Held()
        tokenize = None

        def get_sd(self):
            return {"qwen25_7b.transformer." + k: v for k, v in sd.items()}

    from PIL import Image
    images = [Image.new("RGB", (56, 84), (200, 30, 30)), Image.new("RGB", (84, 56), (30, 30, 200))]
    ours = planner_from_native(QwenClip(), torch.float32, tok_dir, config=TINY_CONFIG)
    mine = Planner.load(path, dtype=torch.float32, tokenizer_dir=tok_dir, config=TINY_CONFIG)
    a, b = ours.encode("a red and a blue card", images), mine.encode("a red and a blue card", images)
    try:  # the planner input refuses a CLIP of another model, naming what to connect
        planner_from_native(type("Clip", (), {"cond_stage_model": torch.nn.Module(), "get_sd": dict,
                                               "patcher": None})(), torch.float32, tok_dir)
        raise AssertionError("a CLIP without Qwen2.5-VL was accepted")
    except Exception as e:  # noqa: BLE001
        assert "type qwen_image" in str(e), e
    close("Qwen2.5-VL planner, ComfyUI's tensors vs our loader", a.positive, b.positive)
    close("Qwen2.5-VL planner (negative)", a.negative, b.negative)


if __name__ == "__main__":
    from bindweave_core.encoders.planner_checkpoint import tiny_tokenizer

    tok = work / "tiny_qwen_tokenizer"
    tiny_tokenizer().save_pretrained(str(tok))
    check_clip_vision()
    check_umt5()
    check_qwen_keys()
    check_planner(str(tok))
    print("ok")

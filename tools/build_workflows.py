"""Build the example workflows in workflows/ (UI format) from compact API-format graphs.

The conversion to the UI format is done by the real ComfyUI frontend (``app.loadApiJson`` then
``app.graph.serialize``) of a running server with this pack installed; this script then adds the
note with the model files and the ``properties.models`` download entries.

    python tools/build_workflows.py --server http://127.0.0.1:8188
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

from comfy_browser import comfy_page  # noqa: E402

from bindweave_core import constants as C  # noqa: E402
from bindweave_core.model_files import MODEL_FILES  # noqa: E402
from bindweave_core.sampling import FEW_STEP_PRESET  # noqa: E402
from nodes.specs import MODEL_FOLDER, SMOKE_CHOICE, SMOKE_KALEIDO_CHOICE  # noqa: E402

DIT = "Wan2_1-I2V-14B-Bindweave_fp8_scaled_KJ.safetensors"
VAE = "wan_2.1_vae.safetensors"
T5 = "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
CLIP = "clip_vision_h.safetensors"
QWEN = "qwen_2.5_vl_7b_fp8_scaled.safetensors"
FAST_LORA = "lightx2v_I2V_14B_480p_cfg_step_distill_rank64_bf16.safetensors"
KALEIDO_DIR = f"{MODEL_FOLDER}/Kaleido-14B-S2V/"
LOADER_FOLDERS = {"BindWeaveDiTLoader": "model_name", "BindWeaveVAELoader": "vae_name",
                  "BindWeaveTextEncoderLoader": "text_encoder_name", "BindWeaveCLIPVisionLoader": "clip_name",
                  "BindWeavePlannerLoader": "planner_name", "BindWeaveLoraLoader": "lora_name",
                  "VAELoader": "vae_name", "LoraLoaderModelOnly": "lora_name"}


def node(class_type: str, title: str | None = None, **inputs) -> dict:
    out = {"class_type": class_type, "inputs": inputs}
    if title:
        out["_meta"] = {"title": title}
    return out


def _references(g: dict, refs: list[str] | None, color: int) -> dict:
    """The reference images wired once: Load Image nodes (or a generated picture for the smoke graphs) into
    BindWeave References, whose one output feeds Planner Encode and Reference Encode (the inputs returned)."""
    images = {}
    if refs is None:  # smoke: a generated picture, so the workflow needs no input file
        g["10"] = node("EmptyImage", "Reference (generated)", width=96, height=128, batch_size=1, color=color)
        images["image_1"] = ["10", 0]
    else:
        for k, name in enumerate(refs, start=1):
            g[str(9 + k)] = node("LoadImage", f"Reference {k}", image=name)
            images[f"image_{k}"] = [str(9 + k), 0]
    g["15"] = node("BindWeaveReferences", invert_masks=True, **images)
    return {"reference_images": ["15", 0]}


def bindweave_graph(*, refs: list[str] | None, prompt: str, width: int, height: int, length: int, steps: int,
                    guidance: float, shift: float, sampler: str = "unipc", seed: int = 42, lora: str | None = None,
                    smoke: bool = False, prefix: str = "BindWeave/video") -> dict:
    pick = (lambda name: SMOKE_CHOICE) if smoke else (lambda name: name)
    g = {
        "1": node("BindWeaveDiTLoader", model_name=pick(DIT), dtype="auto", weight_format="default", attention="sdpa",
                  resident_blocks=-1),
        "2": node("BindWeaveVAELoader", vae_name=pick(VAE), dtype="auto"),
        "3": node("BindWeaveTextEncoderLoader", text_encoder_name=pick(T5), dtype="auto", tokenizer_dir=""),
        "4": node("BindWeaveCLIPVisionLoader", clip_name=pick(CLIP), dtype="auto"),
        "5": node("BindWeavePlannerLoader", planner_name=pick(QWEN), dtype="auto", weight_format="default"),
    }
    model = ["1", 0]
    if lora:
        g["6"] = node("BindWeaveLoraLoader", model=model, lora_name=lora, strength=1.0)
        model = ["6", 0]
    images = _references(g, refs, color=0xE07030)
    g["20"] = node("BindWeavePlannerEncode", planner=["5", 0], prompt=prompt,
                   negative_prompt=C.DEFAULT_PLANNER_NEGATIVE_PROMPT, refine_prompt=False, refine_seed=0, **images)
    g["21"] = node("BindWeaveTextEncode", text_encoder=["3", 0], prompt=["20", 1],
                   negative_prompt=C.DEFAULT_NEGATIVE_PROMPT)
    g["22"] = node("BindWeaveReferenceEncode", vae=["2", 0], clip_vision=["4", 0], width=width, height=height,
                   length=length, mode="bindweave", mask_mode="rectangle", invert_masks=True, **images)
    g["23"] = node("PreviewImage", "What the model sees", images=["22", 1])
    g["24"] = node("MaskPreview", "Reference masks the model sees", mask=["22", 2])
    g["30"] = node("BindWeaveSampler", model=model, text_conditioning=["21", 0], references=["22", 0],
                   planner_conditioning=["20", 0], seed=seed, steps=steps, guidance=guidance, shift=shift,
                   sampler=sampler, cfg_batch="auto", step_cache=0.0)
    g["31"] = node("BindWeaveDecode", vae=["2", 0], samples=["30", 0], tiled=False, fps=float(C.DEFAULT_FPS))
    g["40"] = node("CreateVideo", images=["31", 0], fps=["31", 1])
    g["41"] = node("SaveVideo", video=["40", 0], filename_prefix=prefix, format="mp4", codec="auto",
                   **{"format.codec": "auto"})
    return g


def native_graph(*, refs: list[str] | None, prompt: str, width: int, height: int, length: int, steps: int,
                 guidance: float, shift: float, sampler: str = "uni_pc_bh2", scheduler: str = "simple",
                 seed: int = 42, loras: tuple[tuple[str, float], ...] = (), smoke: bool = False,
                 vae: str = VAE, prefix: str = "BindWeave/native") -> dict:
    """BindWeave in a native graph: our loaders and encoders, then BindWeave to MODEL / BindWeave Conditioning
    -> (LoraLoaderModelOnly ...) -> ModelSamplingSD3 -> KSampler -> ComfyUI's VAE Decode."""
    g = bindweave_graph(refs=refs, prompt=prompt, width=width, height=height, length=length, steps=steps,
                        guidance=guidance, shift=shift, seed=seed, smoke=smoke, prefix=prefix)
    for key in ("30", "31"):  # our Sampler and Decode make way for the native ones
        del g[key]
    g["25"] = node("BindWeaveNativeModel", model=["1", 0])
    model = ["25", 0]
    for k, (name, strength) in enumerate(loras):
        g[str(26 + k)] = node("LoraLoaderModelOnly", lora_name=name, strength_model=strength, model=model)
        model = [str(26 + k), 0]
    g["29"] = node("ModelSamplingSD3", model=model, shift=shift)
    g["32"] = node("BindWeaveConditioning", text_conditioning=["21", 0], references=["22", 0],
                   planner_conditioning=["20", 0])
    g["33"] = node("KSampler", model=["29", 0], positive=["32", 0], negative=["32", 1], latent_image=["32", 2],
                   seed=seed, steps=steps, cfg=guidance, sampler_name=sampler, scheduler=scheduler, denoise=1.0)
    g["34"] = node("VAELoader", vae_name=vae)
    g["35"] = node("VAEDecode", samples=["33", 0], vae=["34", 0])
    g["40"] = node("CreateVideo", images=["35", 0], fps=float(C.DEFAULT_FPS))
    return g


def kaleido_graph(*, refs: list[str] | None, prompt: str, width: int, height: int, length: int, steps: int,
                  smoke: bool = False, seed: int = 42, prefix: str = "Kaleido/video") -> dict:
    """Kaleido-14B-S2V: R-RoPE references, UMT5 only (no planner, no CLIP), its own sampler defaults."""
    g = {
        "1": node("BindWeaveDiTLoader", model_name=SMOKE_KALEIDO_CHOICE if smoke else KALEIDO_DIR, dtype="auto",
                  weight_format="default", attention="sdpa", resident_blocks=-1),
        "2": node("BindWeaveVAELoader", vae_name=SMOKE_CHOICE if smoke else VAE, dtype="auto"),
        "3": node("BindWeaveTextEncoderLoader", text_encoder_name=SMOKE_CHOICE if smoke else T5, dtype="auto",
                  tokenizer_dir=""),
    }
    images = _references(g, refs, color=0x3070E0)
    g["21"] = node("BindWeaveTextEncode", text_encoder=["3", 0], prompt=prompt,
                   negative_prompt=C.KALEIDO_NEGATIVE_PROMPT)
    g["22"] = node("BindWeaveReferenceEncode", vae=["2", 0], width=width, height=height, length=length,
                   mode="kaleido", mask_mode="rectangle", invert_masks=True, **images)
    g["23"] = node("PreviewImage", "What the model sees", images=["22", 1])
    g["24"] = node("MaskPreview", "Reference masks the model sees", mask=["22", 2])
    g["30"] = node("BindWeaveSampler", model=["1", 0], text_conditioning=["21", 0], references=["22", 0], seed=seed,
                   steps=steps, guidance=C.KALEIDO_GUIDANCE, shift=C.KALEIDO_SHIFT, sampler=C.KALEIDO_SAMPLER,
                   cfg_batch="auto", step_cache=0.0)
    g["31"] = node("BindWeaveDecode", vae=["2", 0], samples=["30", 0], tiled=False, fps=float(C.KALEIDO_FPS))
    g["40"] = node("CreateVideo", images=["31", 0], fps=["31", 1])
    g["41"] = node("SaveVideo", video=["40", 0], filename_prefix=prefix, format="mp4", codec="auto",
                   **{"format.codec": "auto"})
    return g


def _models_note(files: list[str], extra: str) -> str:
    rows = [f for f in MODEL_FILES if f.filename in files]
    lines = ["| folder | file | size |", "| --- | --- | --- |"]
    lines += [f"| models/{f.comfy_folder}/ | [{f.filename}]({f.url or f.source}) | {f.size} |" for f in rows]
    return "\n".join(lines) + "\n\n" + extra


def _cases() -> dict:
    cases = json.loads((REPO / "tools/workflow_prompts.json").read_text())
    real = [DIT, VAE, T5, CLIP, QWEN]
    swap = ("Swap the reference images in the Load Image nodes (1-4 references: people, objects, a "
            "background). The preview shows the letterboxed references exactly as the model sees them.")
    return {
        "bindweave_single_subject": dict(
            title="BindWeave: single subject", files=real,
            text="Official settings: 1280x720, 81 frames (5 s at 16 fps), UniPC 50 steps, shift 3, guidance 5. "
                 + swap,
            graph=bindweave_graph(refs=["man.png"], prompt=cases["singleface_1"], width=1280, height=720,
                                  length=81, steps=50, guidance=5.0, shift=3.0, prefix="BindWeave/single_subject")),
        "bindweave_two_subjects": dict(
            title="BindWeave: two subjects interacting", files=real,
            text="Two people, one reference each; the planner reads both images with the prompt, which keeps "
                 "the identities apart. " + swap,
            graph=bindweave_graph(refs=["woman1.jpg", "woman2.jpg"], prompt=cases["multihuman_14"], width=1280,
                                  height=720, length=81, steps=50, guidance=5.0, shift=3.0,
                                  prefix="BindWeave/two_subjects")),
        "bindweave_subject_background": dict(
            title="BindWeave: subjects + background image", files=real,
            text="A person, an animal and a background scene as three references (up to four). Describe where "
                 "each subject is and what it does. " + swap,
            graph=bindweave_graph(refs=["human.jpg", "dog.jpg", "school.jpg"], prompt=cases["faceobj_1"],
                                  width=1280, height=720, length=81, steps=50, guidance=5.0, shift=3.0,
                                  prefix="BindWeave/subject_background")),
        "bindweave_fast_few_step": dict(
            title="BindWeave: fast few-step (step-distilled LoRA)", files=real + [FAST_LORA],
            text="The lightx2v Wan2.1-I2V step-distill LoRA with its authors' recipe (LightX2V "
                 "wan_i2v_distill_4step_cfg_lora.json): rf-euler, 4 steps, shift 5, guidance 1.0 (the negative pass "
                 "is skipped), 832x480: about 20x fewer DiT calls than the official 50 steps with guidance. "
                 "Experimental: the LoRA was distilled from Wan2.1-I2V, not from BindWeave. " + swap,
            graph=bindweave_graph(refs=["man.png"], prompt=cases["singleface_1"], width=832, height=480, length=81,
                                  lora=FAST_LORA, prefix="BindWeave/fast", **FEW_STEP_PRESET)),
        "bindweave_native_ksampler": dict(
            title="BindWeave in a native graph: KSampler", files=real,
            text="The DiT as a native MODEL (BindWeave to MODEL) and the conditioning as native CONDITIONING "
                 "(BindWeave Conditioning), sampled by ComfyUI's KSampler and decoded by its VAE Decode, so native "
                 "model patches (LoRA stacks, ModelSamplingSD3, TorchCompileModel, EasyCache) attach. uni_pc_bh2 "
                 "with the simple scheduler is close to the official UniPC; for the official schedule exactly use "
                 "SamplerCustomAdvanced with BindWeave Sigmas. " + swap,
            graph=native_graph(refs=["man.png"], prompt=cases["singleface_1"], width=1280, height=720, length=81,
                               steps=50, guidance=5.0, shift=3.0, prefix="BindWeave/native")),
        "bindweave_native_lora_stack": dict(
            title="BindWeave in a native graph: LoRA stack", files=real + [FAST_LORA],
            text="LoraLoaderModelOnly nodes on the native MODEL, chained as with any ComfyUI model: original-layout "
                 "Wan 2.1 LoRAs, kohya-style ones and files from the bundled trainer. Here the step-distill LoRA "
                 "(euler, 4 steps, guidance 1, shift 5); add your own LoRAs to the chain. " + swap,
            graph=native_graph(refs=["man.png"], prompt=cases["singleface_1"], width=832, height=480, length=81,
                               steps=4, guidance=1.0, shift=5.0, sampler="euler", loras=((FAST_LORA, 1.0),),
                               prefix="BindWeave/native_lora")),
        "kaleido_two_subjects": dict(
            title="Kaleido-14B-S2V: two subjects (R-RoPE references)", files=[VAE, T5, "Kaleido-14B-S2V (directory)"],
            text="Kaleido's references go, un-noised, in front of the video at shifted rotary positions (1-3 "
                 "references, letterboxed on white). Put the whole zai-org/Kaleido-14B-S2V download in "
                 "models/bindweave/Kaleido-14B-S2V/. Official settings: 896x512, 81 frames, rf-euler 50 steps, "
                 "shift 7, guidance 6 and Kaleido's negative prompt; it likes long, detailed prompts. "
                 "No planner and no CLIP vision are used.",
            graph=kaleido_graph(refs=["woman1.jpg", "woman2.jpg"], prompt=cases["multihuman_14"],
                                width=C.KALEIDO_WIDTH, height=C.KALEIDO_HEIGHT, length=C.KALEIDO_FRAMES,
                                steps=C.KALEIDO_STEPS, prefix="Kaleido/two_subjects")),
        "kaleido_smoke_test": dict(
            title="Kaleido: smoke test (no downloads)", files=[],
            text="The tiny random Kaleido-style DiT (R-RoPE references) with tiny encoders: runs in seconds on a "
                 "CPU and makes noise. Checks the Kaleido path of the pack end to end.",
            graph=kaleido_graph(refs=None, prompt="a man waves at the camera", width=64, height=48, length=5,
                                steps=2, smoke=True, prefix="Kaleido/smoke")),
        "bindweave_smoke_test": dict(
            title="BindWeave: smoke test (no downloads)", files=[],
            text="Tiny random models built in memory: runs in seconds on a CPU and makes noise. Use it to check "
                 "that the pack is installed and a graph runs end to end. Then open the other BindWeave "
                 "workflows for real videos.",
            graph=bindweave_graph(refs=None, prompt="a man waves at the camera", width=64, height=48, length=5,
                                  steps=2, guidance=5.0, shift=3.0, smoke=True, prefix="BindWeave/smoke")),
    }


def _finish(ui: dict, title: str, files: list[str], text: str) -> dict:
    by_name = {f.filename: f for f in MODEL_FILES}
    for n in ui["nodes"]:
        if n["type"] in ("BindWeaveSampler", "KSampler"):
            n["widgets_values"][1] = "fixed"  # keep the seed between runs: reproducible examples
        field = LOADER_FOLDERS.get(n["type"])
        chosen = n.get("widgets_values", [None])[0] if field else None
        f = by_name.get(chosen)
        if f is not None and f.url:
            n.setdefault("properties", {})["models"] = [{"name": f.filename, "url": f.url,
                                                          "directory": f.comfy_folder}]
    note_id = max(n["id"] for n in ui["nodes"]) + 1
    body = f"# {title}\n\n" + (_models_note(files, text) if files else text)
    ui["nodes"].append({"id": note_id, "type": "MarkdownNote", "pos": [-420, 130], "size": [440, 460], "flags": {},
                        "order": len(ui["nodes"]), "mode": 0, "inputs": [], "outputs": [],
                        "properties": {}, "widgets_values": [body], "color": "#432", "bgcolor": "#653"})
    ui["last_node_id"] = note_id
    ui.setdefault("extra", {})["bindweave"] = {"title": title}
    ui["extra"].pop("ds", None)  # no saved viewport: the frontend fits the graph on load
    return ui


async def build(server: str, out_dir: Path, only: list[str] | None) -> None:
    async with comfy_page(server) as page:
        for name, case in _cases().items():
            if only and name not in only:
                continue
            ui = await page.evaluate("""async ([api, name]) => {
                await app.loadApiJson(api, name);
                for (const n of app.graph._nodes) {
                    if (n.type === 'LoadImage' || n.type === 'PreviewImage') n.size = [300, 340];
                }
                app.graph.arrange(60);
                return app.graph.serialize(); }""", [case["graph"], name])
            ui = _finish(ui, case["title"], case["files"], case["text"])
            (out_dir / f"{name}.json").write_text(json.dumps(ui, indent=1) + "\n")
            print(f"wrote {out_dir / (name + '.json')} ({len(ui['nodes'])} nodes)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--server", default="http://127.0.0.1:8188")
    ap.add_argument("--out", default=str(REPO / "workflows"))
    ap.add_argument("--only", nargs="*")
    args = ap.parse_args()
    asyncio.run(build(args.server, Path(args.out), args.only))


if __name__ == "__main__":
    main()

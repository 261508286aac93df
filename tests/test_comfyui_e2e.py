"""End to end in a real ComfyUI server (enabled when COMFYUI_PATH points at a ComfyUI checkout).

Starts ComfyUI on the CPU with only this pack installed (in a temporary base directory), checks our
nodes in /object_info, validates every shipped workflow against the server's node schemas, loads
each one in the server's own frontend (headless Chromium, when available), and runs the smoke
workflow through /prompt, reading the video back from /history. See docs/comfyui-versions.md for
setting up a ComfyUI checkout; COMFYUI_PYTHON names the interpreter of its environment.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from bindweave_core.model_files import MODEL_FILES
from bindweave_core.video_io import read_video
from helpers import CORE_NODES, FRONTEND_ONLY_NODES, FRONTEND_WIDGETS, REPO
from nodes.specs import MODEL_FOLDER, SMOKE_CHOICE, SPECS

COMFYUI = os.environ.get("COMFYUI_PATH")
PYTHON = os.environ.get("COMFYUI_PYTHON", sys.executable)
pytestmark = [pytest.mark.comfyui, pytest.mark.skipif(
    not COMFYUI, reason="needs a ComfyUI server: set COMFYUI_PATH to a ComfyUI checkout (and COMFYUI_PYTHON to its interpreter) "
                        "to run the end-to-end tests in a real ComfyUI server")]
sys.path.insert(0, str(REPO / "tools"))
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


TINY_PACK = "bindweave_e2e_tiny_loaders"
# A test-only node pack: ComfyUI's own CLIP (UMT5) and CLIP vision model classes at the tiny test size, loaded from
# a file as its Load CLIP / Load CLIP Vision load one (those build the released sizes only).
_TINY_PACK_SOURCE = """
import sys

import folder_paths

sys.path.append("TESTS")


class TinyComfyCLIPVisionLoader:
    CATEGORY, FUNCTION, RETURN_TYPES = "testing", "load", ("CLIP_VISION",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip_name": (folder_paths.get_filename_list("clip_vision"),)}}

    def load(self, clip_name):
        from comfy_native_encoders import comfy_clip_vision

        return (comfy_clip_vision(folder_paths.get_full_path("clip_vision", clip_name)),)


class TinyComfyUMT5Loader:
    CATEGORY, FUNCTION, RETURN_TYPES = "testing", "load", ("CLIP",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip_name": (folder_paths.get_filename_list("text_encoders"),)}}

    def load(self, clip_name):
        from comfy_native_encoders import comfy_umt5_clip

        return (comfy_umt5_clip(folder_paths.get_full_path("text_encoders", clip_name)),)


NODE_CLASS_MAPPINGS = {"TinyComfyCLIPVisionLoader": TinyComfyCLIPVisionLoader,
                       "TinyComfyUMT5Loader": TinyComfyUMT5Loader}
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "ComfyUI-BindWeave").symlink_to(REPO, target_is_directory=True)
    (base / "custom_nodes" / TINY_PACK).mkdir()
    (base / "custom_nodes" / TINY_PACK / "__init__.py").write_text(_TINY_PACK_SOURCE.replace("TESTS", str(REPO / "tests")))
    for d in ("input", "output", "temp", "user", "models"):
        (base / d).mkdir()
    # The server imports this checkout's core too, not another copy installed in ComfyUI's environment
    # (an editable install of the pack there would otherwise win over the pack's own folder).
    core = base / "core_path"
    core.mkdir()
    (core / "bindweave_core").symlink_to(REPO / "bindweave_core", target_is_directory=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(core), os.environ.get("PYTHONPATH")]))}
    port = _free_port()
    log = open(base / "comfyui.log", "w")
    proc = subprocess.Popen(
        [PYTHON, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
         "--disable-api-nodes", "--base-directory", str(base), "--database-url", "sqlite:///:memory:",
         "--disable-all-custom-nodes", "--whitelist-custom-nodes", "ComfyUI-BindWeave", TINY_PACK,
         # previews on: ComfyUI 0.3.64 takes the preview method only from its command line (newer: per prompt too)
         "--preview-method", "latent2rgb"],
        cwd=COMFYUI, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        try:
            get_json(url + "/object_info/LoadImage")
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail("ComfyUI did not start:\n" + (base / "comfyui.log").read_text()[-3000:])
            time.sleep(1)
    try:
        yield {"url": url, "base": base, "object_info": get_json(url + "/object_info")}
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def widget_names(info: dict) -> list[str]:
    """An /object_info entry's widget inputs, in the order the frontend stores their values."""
    names = []
    for group in ("required", "optional"):
        for name, (kind, *opts) in info["input"].get(group, {}).items():
            if isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                names.append(name)
                if opts and opts[0].get("control_after_generate"):
                    names.append(f"{name}:control")
    return names


def test_our_nodes_are_registered_with_docs(server):
    info = server["object_info"]
    for node_id, spec in SPECS.items():
        assert node_id in info, f"{node_id} missing; see {server['base'] / 'comfyui.log'}"
        entry = info[node_id]
        assert entry["description"] == spec.description and entry["category"] == spec.category
        for group in ("required", "optional"):
            for name, (_, *opts) in entry["input"].get(group, {}).items():
                assert opts and opts[0].get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert entry["output"] == [o.type for o in spec.outputs]
        ours = [w.name for w in spec.widgets()]
        theirs = [n for n in widget_names(entry) if not n.endswith(":control")]
        assert theirs == ours, node_id


# Widgets of core nodes the workflows were saved with (ComfyUI 0.33.0) that older supported versions lack:
# an older frontend drops the extra value and the server ignores the input, so the workflows still run.
NEWER_CORE_WIDGETS = {"CreateVideo.bit_depth": "0.3.64"}


def test_node_widget_bounds_are_the_settings_validators(server):
    """Every widget of a generation setting shows, in ComfyUI's own /object_info, the min/max of the one
    settings validator (bindweave_core.setting_bounds)."""
    from bindweave_core.setting_bounds import SETTINGS

    info = server["object_info"]
    compared = 0
    for node_id, spec in SPECS.items():
        for i in spec.inputs:
            if not i.setting:
                continue
            group = "optional" if i.optional else "required"
            _, opts = info[node_id]["input"][group][i.name]
            assert (opts["min"], opts["max"]) == (SETTINGS[i.setting].min, SETTINGS[i.setting].max), (node_id, i.name)
            compared += 1
    assert compared == 15, compared  # every setting widget of the 6 nodes that have one


def test_core_nodes_used_by_the_workflows_exist(server):
    info = server["object_info"]
    for node_type, widgets in CORE_NODES.items():
        assert node_type in info, node_type
        inputs = {**info[node_type]["input"].get("required", {}), **info[node_type]["input"].get("optional", {})}
        for w in widgets:  # "format.codec": a sub-input of the dynamic combo "format"
            assert w.split(".")[0] in inputs or w in FRONTEND_WIDGETS or f"{node_type}.{w}" in NEWER_CORE_WIDGETS, \
                f"{node_type}.{w}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_validates_against_server_schemas(server, path):
    info = server["object_info"]
    files = {f.filename for f in MODEL_FILES}
    wf = json.loads(path.read_text())
    for node in wf["nodes"]:
        if node["type"] in FRONTEND_ONLY_NODES:
            continue
        assert node["type"] in info, f"{path.name}: {node['type']} is not a node of this ComfyUI"
        if node["type"] not in SPECS:
            continue
        names = widget_names(info[node["type"]])
        values = node.get("widgets_values", [])  # a node without widgets has none
        assert len(values) == len(names), (node["type"], names, values)
        inputs = {**info[node["type"]]["input"].get("required", {}), **info[node["type"]]["input"].get("optional", {})}
        for name, value in zip(names, values):
            if name.endswith(":control"):
                continue
            kind = inputs[name][0]
            if isinstance(kind, list) or kind == "COMBO":
                options = kind if isinstance(kind, list) else inputs[name][1]["options"]
                assert value in options or value in files or value.startswith(MODEL_FOLDER + "/"), \
                    f"{path.name}: {node['type']}.{name}={value!r}"


def _browser_skip() -> str | None:
    from comfy_browser import browser_available

    return browser_available()


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_loads_in_the_frontend_without_missing_nodes(server, path):
    reason = _browser_skip()
    if reason:
        pytest.skip(f"needs a browser: {reason}")
    from comfy_browser import comfy_page, load_workflow

    async def run():
        async with comfy_page(server["url"]) as page:
            return await load_workflow(page, json.loads(path.read_text()))

    result = asyncio.run(run())
    assert result["missing"] == [] and result["count"] == len(json.loads(path.read_text())["nodes"])


def _smoke_prompt(server, name: str) -> dict:
    """A shipped smoke workflow in API format, converted by the server's frontend when possible."""
    wf = json.loads((REPO / f"workflows/{name}.json").read_text())
    if _browser_skip() is None:
        from comfy_browser import comfy_page, workflow_to_api

        async def convert():
            async with comfy_page(server["url"]) as page:
                return await workflow_to_api(page, wf)

        return asyncio.run(convert())
    from build_workflows import _cases  # the graph the workflow was built from

    return _cases()[name]["graph"]


@pytest.mark.parametrize("name", ["bindweave_smoke_test", "kaleido_smoke_test"])
def test_smoke_workflow_runs_and_makes_the_requested_frames(server, name):
    from comfy_browser import post_json

    prompt = _smoke_prompt(server, name)
    refs = next(n for n in prompt.values() if n["class_type"] == "BindWeaveReferenceEncode")["inputs"]
    reply = post_json(server["url"] + "/prompt", {"prompt": prompt})
    assert reply["node_errors"] == {}
    pid = reply["prompt_id"]
    deadline = time.time() + 300
    while True:
        history = get_json(f"{server['url']}/history/{pid}")
        if pid in history:
            break
        assert time.time() < deadline, "smoke workflow did not finish in 5 minutes"
        time.sleep(1)
    status = history[pid]["status"]
    errors = [m for m in status["messages"] if m[0] == "execution_error"]
    assert status["status_str"] == "success", errors
    videos = [v for out in history[pid]["outputs"].values() for v in out.get("images", []) + out.get("videos", [])
              if v["filename"].endswith(".mp4")]
    assert len(videos) == 1
    video = Path(server["base"]) / "output" / videos[0]["subfolder"] / videos[0]["filename"]
    frames, fps = read_video(video)
    assert frames.shape == (refs["length"], refs["height"], refs["width"], 3)
    assert fps == 16


@pytest.mark.parametrize("resident_blocks", [-1, 1])
def test_lora_node_in_comfyui_matches_the_core_library(server, resident_blocks):
    """The LoRA node (ComfyUI's weight patching) gives the latents of the core's apply_lora, same inputs;
    also with DiT block offload (1 of the 2 tiny blocks streamed), where ComfyUI patches the weights on
    the offload device and the core streams them."""
    import copy

    import torch
    from build_workflows import _cases
    from comfy_browser import post_json
    from PIL import Image
    from safetensors.torch import load_file

    from bindweave_core.lora import LoraLayer, LoraWeights, apply_lora, save_lora
    from bindweave_core.pipeline import BindWeavePipeline, GenerationSettings

    g = torch.Generator().manual_seed(5)
    pipe = BindWeavePipeline.smoke(seed=0)
    dit = pipe.component("dit")
    layers = {}
    for name in ("blocks.0.attn1.to_q", "blocks.1.ffn.net.2", "blocks.0.attn2.add_k_proj"):
        m = dit.get_submodule(name)
        layers[name] = LoraLayer(down=torch.randn(4, m.in_features, generator=g) * 0.3,
                                 up=torch.randn(m.out_features, 4, generator=g) * 0.3, alpha=4.0)
    lora = LoraWeights(layers=layers)
    (server["base"] / "models" / "loras").mkdir(parents=True, exist_ok=True)
    save_lora(lora, server["base"] / "models" / "loras" / "bw_test_lora.safetensors")

    prompt = copy.deepcopy(_cases()["bindweave_smoke_test"]["graph"])
    prompt["1"]["inputs"]["resident_blocks"] = resident_blocks
    prompt["6"] = {"class_type": "BindWeaveLoraLoader",
                   "inputs": {"model": ["1", 0], "lora_name": "bw_test_lora.safetensors", "strength": 0.8}}
    prompt["30"]["inputs"]["model"] = ["6", 0]
    prompt["50"] = {"class_type": "SaveLatent",
                    "inputs": {"samples": ["30", 0], "filename_prefix": f"bw_test/lora{resident_blocks}"}}
    log_start = len((server["base"] / "comfyui.log").read_text())
    reply = post_json(server["url"] + "/prompt", {"prompt": prompt})
    pid = reply["prompt_id"]
    deadline = time.time() + 300
    while pid not in (history := get_json(f"{server['url']}/history/{pid}")):
        assert time.time() < deadline
        time.sleep(1)
    assert history[pid]["status"]["status_str"] == "success", history[pid]["status"]["messages"]
    saved = history[pid]["outputs"]["50"]["latents"][0]
    streamed = "DiT block offload: 1 of 2 blocks resident" in (server["base"] / "comfyui.log").read_text()[log_start:]
    assert streamed == (resident_blocks == 1)
    served = load_file(str(server["base"] / "output" / saved["subfolder"] / saved["filename"]))["latent_tensor"]
    served = _normalised(served, _tiny_vae_stats())  # a LATENT is in the (smoke) VAE's raw space

    sampler, refs = prompt["30"]["inputs"], prompt["22"]["inputs"]
    colour = prompt["10"]["inputs"]["color"]
    reference = Image.new("RGB", (prompt["10"]["inputs"]["width"], prompt["10"]["inputs"]["height"]),
                          ((colour >> 16) & 255, (colour >> 8) & 255, colour & 255))
    settings = GenerationSettings(prompt=prompt["20"]["inputs"]["prompt"], width=refs["width"], height=refs["height"],
                                  num_frames=refs["length"], steps=sampler["steps"], guidance=sampler["guidance"],
                                  shift=sampler["shift"], sampler=sampler["sampler"], seed=sampler["seed"])
    plain = pipe.generate([reference], settings).latents
    apply_lora(dit, lora, strength=0.8)
    expected = pipe.generate([reference], settings).latents
    assert (expected - plain).abs().max() > 1e-3  # the LoRA matters
    torch.testing.assert_close(served, expected, rtol=0, atol=1e-4)


def test_nan_lora_is_an_error_in_the_history_never_a_video(server):
    """A LoRA holding NaN through our LoRA node: the run ends with the named error in the history, no video
    is written, and the server answers afterwards (issue 24: a NaN LoRA never produces a video silently)."""
    import copy

    import torch
    from build_workflows import _cases
    from comfy_browser import post_json
    from safetensors.torch import save_file

    (server["base"] / "models" / "loras").mkdir(parents=True, exist_ok=True)
    up = torch.zeros(64, 4)
    up[0, 0] = float("nan")
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.zeros(4, 64),
               "diffusion_model.blocks.0.self_attn.q.lora_B.weight": up},
              str(server["base"] / "models" / "loras" / "bw_nan_lora.safetensors"))
    prompt = copy.deepcopy(_cases()["bindweave_smoke_test"]["graph"])
    prompt["6"] = {"class_type": "BindWeaveLoraLoader",
                   "inputs": {"model": ["1", 0], "lora_name": "bw_nan_lora.safetensors", "strength": 1.0}}
    prompt["30"]["inputs"]["model"] = ["6", 0]
    outputs_before = sorted(p.name for p in (server["base"] / "output").rglob("*.mp4"))
    pid = post_json(server["url"] + "/prompt", {"prompt": prompt})["prompt_id"]
    deadline = time.time() + 300
    while pid not in (history := get_json(f"{server['url']}/history/{pid}")):
        assert time.time() < deadline
        time.sleep(1)
    status = history[pid]["status"]
    errors = [m[1] for m in status["messages"] if m[0] == "execution_error"]
    assert status["status_str"] == "error" and len(errors) == 1, status
    assert "bw_nan_lora.safetensors: tensor diffusion_model.blocks.0.self_attn.q.lora_B.weight holds non-finite " \
           "values (1 NaN, 0 inf of 256)" in errors[0]["exception_message"], errors[0]
    assert sorted(p.name for p in (server["base"] / "output").rglob("*.mp4")) == outputs_before
    assert "BindWeaveSampler" in get_json(server["url"] + "/object_info/BindWeaveSampler")  # still healthy


_COMFY_LORA_SCRIPT = r'''
import json, logging, sys
from types import SimpleNamespace
lora_path, out_path, strength = sys.argv[1], sys.argv[2], float(sys.argv[3])
sys.argv = [sys.argv[0], "--cpu"]  # as the server runs: ComfyUI reads its command line on import
import comfy.options
comfy.options.enable_args_parsing()
import torch
import comfy.lora, comfy.ops, comfy.utils
from comfy.ldm.wan.model import WanModel
from safetensors.torch import save_file

net = WanModel(model_type="i2v", dim=64, ffn_dim=128, num_heads=2, num_layers=2, in_dim=36, out_dim=16, text_dim=32,
               freq_dim=32, operations=comfy.ops.disable_weight_init, device="meta")
sd = {"diffusion_model." + k: v for k, v in net.state_dict().items()}
model = SimpleNamespace(state_dict=lambda: sd, model_config=SimpleNamespace(unet_config={}))
not_loaded = []
handler = logging.Handler()
handler.emit = lambda record: not_loaded.append(record.getMessage())
logging.getLogger().addHandler(handler)
patches = comfy.lora.load_lora(comfy.utils.load_torch_file(lora_path), comfy.lora.model_lora_keys_unet(model, {}))
deltas = {k: comfy.lora.calculate_weight([(strength, p, 1.0, None, None)], torch.zeros(sd[k].shape), k)
          for k, p in patches.items()}
save_file(deltas, out_path)
print(json.dumps([m for m in not_loaded if "not loaded" in m]))
'''


def test_comfyui_native_lora_loader_reads_our_lora_files(tmp_path):
    """ComfyUI's own LoRA loader (for its native Wan model) reads a trainer-format file: every pair lands
    on the right weight with the right scale and orientation; only the BindWeave connector is skipped."""
    import torch
    from safetensors.torch import load_file

    from bindweave_core.lora import LoraLayer, LoraWeights, original_name, save_lora
    from bindweave_core.smoke import smoke_dit

    dit = smoke_dit(0)
    g = torch.Generator().manual_seed(3)
    names = ["blocks.0.attn1.to_q", "blocks.0.attn1.to_out.0", "blocks.1.attn2.to_k", "blocks.1.attn2.add_v_proj",
             "blocks.0.ffn.net.0.proj", "blocks.1.ffn.net.2"]
    layers = {}
    for i, name in enumerate(names):
        m = dit.get_submodule(name)
        rank = 2 + i % 3
        layers[name] = LoraLayer(down=torch.randn(rank, m.in_features, generator=g),
                                 up=torch.randn(m.out_features, rank, generator=g), alpha=[None, 3.0, 8.0][i % 3])
    diffs = {"condition_embedder.text_projector.linear_1.weight": torch.randn(64, 64, generator=g)}
    path = save_lora(LoraWeights(layers=layers, diffs=diffs), tmp_path / "trained.safetensors")

    out = tmp_path / "deltas.safetensors"
    run = subprocess.run([PYTHON, "-c", _COMFY_LORA_SCRIPT, str(path), str(out), "0.8"], cwd=COMFYUI,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": COMFYUI})
    assert run.returncode == 0, run.stderr[-3000:]
    not_loaded = json.loads(run.stdout.strip().splitlines()[-1])
    deltas = load_file(str(out))
    assert set(deltas) == {f"diffusion_model.{original_name(n)}.weight" for n in names}
    for name, layer in layers.items():
        expected = 0.8 * layer.scale * (layer.up @ layer.down)
        torch.testing.assert_close(deltas[f"diffusion_model.{original_name(name)}.weight"], expected,
                                   rtol=1e-5, atol=1e-5)
    assert len(not_loaded) == 1 and "text_projection.0.diff" in not_loaded[0]


def _watch(server, prompt: dict, extra_data: dict | None = None, interrupt=None, timeout: float = 300) -> list:
    """Queue ``prompt`` and record its websocket traffic until it ends: ``(time, kind, data)`` with kind a
    JSON message type or "binary" (preview frames). ``interrupt(events)`` returning True posts /interrupt."""
    import uuid

    import aiohttp
    from comfy_browser import post_json

    client = uuid.uuid4().hex
    ws_url = server["url"].replace("http://", "ws://") + f"/ws?clientId={client}"

    async def run() -> list:
        events, interrupted = [], False
        async with aiohttp.ClientSession() as session, session.ws_connect(ws_url) as ws:
            body = {"prompt": prompt, "client_id": client, **({"extra_data": extra_data} if extra_data else {})}
            reply = post_json(server["url"] + "/prompt", body)
            assert reply["node_errors"] == {}, reply
            pid = reply["prompt_id"]
            deadline = time.time() + timeout
            while time.time() < deadline:
                msg = await ws.receive(timeout=deadline - time.time())
                now = time.time()
                if msg.type == aiohttp.WSMsgType.BINARY:
                    events.append((now, "binary", None))
                    continue
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                data = json.loads(msg.data)
                kind, payload = data["type"], data.get("data", {})
                if payload.get("prompt_id", pid) != pid:
                    continue
                events.append((now, kind, payload))
                if interrupt is not None and not interrupted and interrupt(events):
                    post_json(server["url"] + "/interrupt", {})
                    interrupted = True
                    events.append((time.time(), "interrupt_sent", None))
                if kind in ("execution_success", "execution_error", "execution_interrupted"):
                    return events
        raise AssertionError(f"prompt did not end in {timeout} s: {events[-5:]}")

    return asyncio.run(run())


def test_sampler_sends_live_latent_previews(server):
    """Our Sampler sends a preview frame per step through ComfyUI's previewer (Wan 2.1 latent format)."""
    import copy

    from build_workflows import _cases

    prompt = copy.deepcopy(_cases()["bindweave_smoke_test"]["graph"])
    prompt["30"]["inputs"].update(steps=4, seed=777)  # a seed of its own: not served from the cache
    events = _watch(server, prompt, extra_data={"preview_method": "latent2rgb"})
    assert events[-1][1] == "execution_success", events[-3:]
    sampling = [e for e in events if e[1] == "progress" and e[2].get("node") == "30"]
    previews = [e for e in events if e[1] == "binary"]
    print(f"previews: {len(previews)} frames over {len(sampling)} sampler progress messages")
    assert len(sampling) >= 4 and len(previews) >= 4, (len(sampling), len(previews))


def test_cancel_during_reference_encode_stops_within_a_chunk(server):
    """Reference Encode reports its VAE chunks as progress and stops at the next chunk after Cancel."""
    from build_workflows import node

    smoke = SMOKE_CHOICE
    prompt = {
        "2": node("BindWeaveVAELoader", vae_name=smoke, dtype="auto"),
        "4": node("BindWeaveCLIPVisionLoader", clip_name=smoke, dtype="auto"),
        "10": node("EmptyImage", width=96, height=128, batch_size=1, color=0x2080C0),
        "22": node("BindWeaveReferenceEncode", vae=["2", 0], clip_vision=["4", 0], image_1=["10", 0], width=192,
                   height=144, length=33, mode="bindweave", mask_mode="rectangle", invert_masks=True),
        "23": node("PreviewImage", images=["22", 1]),
    }
    progress = lambda events: [e for e in events if e[1] == "progress" and e[2].get("node") == "22"]  # noqa: E731
    # cancel once the video condition's chunks are under way (chunk 0 is the reference itself)
    events = _watch(server, prompt, interrupt=lambda ev: any(e[2]["value"] >= 3 for e in progress(ev)))
    assert events[-1][1] == "execution_interrupted", events[-3:]
    sent = next(t for t, kind, _ in events if kind == "interrupt_sent")
    ticks = [t for t, _, p in progress(events)]
    before = [t for t in ticks if t <= sent]
    after = [t for t in ticks if t > sent]
    chunk = max(b - a for a, b in zip(before[1:], before[2:]))  # the slowest video chunk seen before Cancel
    stopped = events[-1][0] - sent
    total = 1 + (33 - 1) // 4 + 1  # the reference, then the video condition's chunks
    assert max(p["value"] for _, _, p in progress(events)) < total - 1, "it ran to the end"
    print(f"cancel: stopped {stopped:.2f} s after Cancel; slowest chunk {chunk:.2f} s; {len(after)} tick(s) after")
    assert len(after) <= 1 and stopped <= chunk + 1.0, (stopped, chunk, len(after))


# ------------------------------------------------------------------------------------------ native route
def _finished(server, prompt: dict, timeout: float) -> dict:
    """Queue an API prompt (the server must accept it) and wait for it: its /history entry."""
    from comfy_browser import post_json

    reply = post_json(server["url"] + "/prompt", {"prompt": prompt})
    assert reply["node_errors"] == {}, reply
    pid = reply["prompt_id"]
    deadline = time.time() + timeout
    while pid not in (history := get_json(f"{server['url']}/history/{pid}")):
        assert time.time() < deadline, f"prompt did not finish in {timeout} s"
        time.sleep(1)
    return history[pid]


def _run(server, prompt: dict, timeout: float = 600) -> dict:
    """Queue an API prompt, wait for it, return its outputs (failing with the server's error)."""
    entry = _finished(server, prompt, timeout)
    status = entry["status"]
    assert status["status_str"] == "success", [m for m in status["messages"] if m[0] == "execution_error"]
    return entry["outputs"]


def _saved_latent(server, outputs: dict, node_id: str):
    from safetensors.torch import load_file

    saved = outputs[node_id]["latents"][0]
    return load_file(str(server["base"] / "output" / saved["subfolder"] / saved["filename"]))["latent_tensor"]


def _saved_frames(server, outputs: dict, node_id: str):
    import numpy as np
    from PIL import Image

    return np.stack([np.asarray(Image.open(server["base"] / "output" / i["subfolder"] / i["filename"]), dtype=np.float32)
                     for i in outputs[node_id]["images"]]) / 255.0


def _normalised(raw, stats):
    """A LATENT's raw VAE-space samples -> the DiT's normalised latents, with a VAE's mean/std."""
    import torch

    mean, std = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1, 1) for v in stats)
    return (raw - mean) / std


def _tiny_vae_stats():
    from bindweave_core.encoders.vae import TINY_VAE_CONFIG

    return TINY_VAE_CONFIG["latents_mean"], TINY_VAE_CONFIG["latents_std"]


def _wan21_stats():
    """The statistics of ComfyUI's Wan21 latent format (comfy/latent_formats.py), which the native MODEL
    uses; equal to the released Wan 2.1 VAE's (our WAN21_VAE_CONFIG, checked against diffusers' defaults)."""
    from bindweave_core.encoders.vae import WAN21_VAE_CONFIG

    return WAN21_VAE_CONFIG["latents_mean"], WAN21_VAE_CONFIG["latents_std"]


@pytest.fixture(scope="module")
def wan_vae_file(server):
    """A Wan 2.1 VAE of the released width (base dim 96) with our smoke model's seeded weights, in the
    original layout, for ComfyUI's own VAELoader (key names: tests/test_vae.py original_state_dict).
    Full width because ComfyUI 0.3.64's loader builds every Wan 2.1 VAE at width 96 whatever the file
    holds (newer ones read the width from the file)."""
    import torch
    from diffusers import AutoencoderKLWan
    from safetensors.torch import save_file
    from test_vae import original_state_dict

    from bindweave_core.encoders.vae import WAN21_VAE_CONFIG, _tiny_value, seeded_init_

    with torch.device("meta"):
        model = AutoencoderKLWan(**WAN21_VAE_CONFIG)
    model = model.to_empty(device="cpu")
    seeded_init_(model, 0, _tiny_value)
    folder = server["base"] / "models" / "vae"
    folder.mkdir(parents=True, exist_ok=True)
    save_file(original_state_dict(model), str(folder / "bw_wan21_vae.safetensors"))
    return "bw_wan21_vae.safetensors"


def _custom_sampling(g: dict, model: list, conditioning: list, steps: int, shift: float, cfg: float, seed: int,
                     schedule: str, base: int) -> str:
    """SamplerCustomAdvanced (euler) with the official noise and sigmas (BindWeave Noise, Sigmas) on a native MODEL."""
    from build_workflows import node

    b = str(base)
    g[b + "1"] = node("BindWeaveSigmas", steps=steps, shift=shift, schedule=schedule)
    g[b + "2"] = node("BindWeaveNoise", noise_seed=seed)  # the official noise, as our Sampler draws it
    g[b + "3"] = node("CFGGuider", model=model, positive=[conditioning[0], 0], negative=[conditioning[0], 1], cfg=cfg)
    g[b + "4"] = node("KSamplerSelect", sampler_name="euler")
    g[b + "5"] = node("SamplerCustomAdvanced", noise=[b + "2", 0], guider=[b + "3", 0], sampler=[b + "4", 0],
                      sigmas=[b + "1", 0], latent_image=[conditioning[0], 2])
    return b + "5"


def test_native_graph_matches_our_sampler_and_decodes_like_ours(server, wan_vae_file):
    """Our loaders + BindWeave Conditioning -> KSampler -> ComfyUI's VAE Decode writes a video; with euler and
    the same sigmas (SamplerCustomAdvanced) the native latents equal our Sampler's; ComfyUI's VAE Decode of
    our Sampler's LATENT equals our Decode, and our Decode takes KSampler's LATENT as ComfyUI's VAE Decode does."""
    import copy

    import torch
    from build_workflows import _cases, native_graph, node

    seed, steps = 321, 3
    g = copy.deepcopy(_cases()["bindweave_smoke_test"]["graph"])
    g["30"]["inputs"].update(sampler="euler", steps=steps, seed=seed)
    g["2"]["inputs"]["vae_name"] = wan_vae_file  # our VAE loader on the file ComfyUI's VAE Loader reads
    del g["40"], g["41"]
    g["50"] = node("SaveLatent", samples=["30", 0], filename_prefix="native/ours")
    g["51"] = node("SaveImage", images=["31", 0], filename_prefix="native/our_decode")
    g["60"] = node("BindWeaveNativeModel", model=["1", 0])
    g["61"] = node("BindWeaveConditioning", text_conditioning=["21", 0], references=["22", 0],
                   planner_conditioning=["20", 0])
    sampled = _custom_sampling(g, ["60", 0], ["61"], steps, 3.0, 5.0, seed, "euler", 7)
    g["80"] = node("SaveLatent", samples=[sampled, 0], filename_prefix="native/custom")
    g["81"] = node("VAELoader", vae_name=wan_vae_file)
    g["82"] = node("VAEDecode", samples=["30", 0], vae=["81", 0])
    g["83"] = node("SaveImage", images=["82", 0], filename_prefix="native/comfy_decode")
    # the plain native graph: KSampler (its own schedule) -> VAE Decode -> video; and our Decode of its LATENT
    native = native_graph(refs=None, prompt=g["20"]["inputs"]["prompt"], width=64, height=48, length=5, steps=steps,
                          guidance=5.0, shift=3.0, sampler="euler", seed=seed, smoke=True, vae=wan_vae_file,
                          prefix="native/ksampler")
    g.update({k: v for k, v in native.items() if k not in g})
    g["33"]["inputs"]["model"] = ["29", 0]
    g["90"] = node("SaveImage", images=["35", 0], filename_prefix="native/ksampler_comfy_decode")
    g["91"] = node("BindWeaveDecode", vae=["2", 0], samples=["33", 0], tiled=False, fps=16.0)
    g["92"] = node("SaveImage", images=["91", 0], filename_prefix="native/ksampler_our_decode")
    out = _run(server, g)

    ours = _normalised(_saved_latent(server, out, "50"), _wan21_stats())  # the raw space of that file's VAE
    custom = _normalised(_saved_latent(server, out, "80"), _wan21_stats())  # the native MODEL's latent format
    print(f"native vs our Sampler: max |diff| {(custom - ours).abs().max():.2e} (latents up to {ours.abs().max():.2f})")
    torch.testing.assert_close(custom, ours, rtol=0, atol=1e-4)

    decoded = abs(_saved_frames(server, out, "83") - _saved_frames(server, out, "51")).max()
    from_ksampler = abs(_saved_frames(server, out, "92") - _saved_frames(server, out, "90")).max()
    print(f"VAE Decode vs our Decode: {decoded * 255:.2f}/255 (our Sampler), {from_ksampler * 255:.2f}/255 (KSampler)")
    assert decoded <= 1 / 255 + 1e-6 and from_ksampler <= 1 / 255 + 1e-6

    video = out["41"]["images"][0]
    frames, fps = read_video(server["base"] / "output" / video["subfolder"] / video["filename"])
    assert frames.shape == (5, 48, 64, 3) and fps == 16


def test_native_kaleido_matches_our_sampler(server):
    """Kaleido (R-RoPE references) on the native route: rf-euler's sigmas with ComfyUI's euler equal our
    Sampler's rf-euler."""
    import copy

    import torch
    from build_workflows import _cases, node

    seed, steps = 17, 3
    g = copy.deepcopy(_cases()["kaleido_smoke_test"]["graph"])
    g["30"]["inputs"].update(steps=steps, seed=seed)
    for key in ("31", "40", "41"):
        del g[key]
    sampler = g["30"]["inputs"]
    g["50"] = node("SaveLatent", samples=["30", 0], filename_prefix="native/kaleido_ours")
    g["60"] = node("BindWeaveNativeModel", model=["1", 0])
    g["61"] = node("BindWeaveConditioning", text_conditioning=["21", 0], references=["22", 0])
    sampled = _custom_sampling(g, ["60", 0], ["61"], steps, sampler["shift"], sampler["guidance"], seed,
                               sampler["sampler"], 7)
    g["80"] = node("SaveLatent", samples=[sampled, 0], filename_prefix="native/kaleido_custom")
    out = _run(server, g)
    ours = _normalised(_saved_latent(server, out, "50"), _tiny_vae_stats())
    custom = _normalised(_saved_latent(server, out, "80"), _wan21_stats())
    print(f"Kaleido native vs our Sampler: max |diff| {(custom - ours).abs().max():.2e}")
    torch.testing.assert_close(custom, ours, rtol=0, atol=1e-4)


def _lora_files(folder: Path) -> dict:
    """An original-layout Wan LoRA (lora_down/lora_up + alpha as in kohya-style and step-distill files,
    lora_A/lora_B without alpha, .diff / .diff_b on a block's modulation, a bias and the head; key names
    as ComfyUI's comfy/lora.py reads them) and a file from our trainer (bindweave_core.lora.save_lora)."""
    import torch
    from safetensors.torch import save_file

    from bindweave_core.lora import LoraLayer, LoraWeights, save_lora
    from bindweave_core.smoke import smoke_dit

    dit = smoke_dit(0)
    g = torch.Generator().manual_seed(11)

    def r(*shape, scale=0.3):
        return torch.randn(*shape, generator=g) * scale

    p = "diffusion_model.blocks"
    original = {
        f"{p}.0.self_attn.q.lora_down.weight": r(4, 64), f"{p}.0.self_attn.q.lora_up.weight": r(64, 4),
        f"{p}.0.self_attn.q.alpha": torch.tensor(2.0),
        f"{p}.1.cross_attn.k_img.lora_A.weight": r(2, 64), f"{p}.1.cross_attn.k_img.lora_B.weight": r(64, 2),
        f"{p}.1.ffn.2.lora_A.weight": r(3, 128), f"{p}.1.ffn.2.lora_B.weight": r(64, 3),
        f"{p}.1.modulation.diff": r(1, 6, 64), f"{p}.0.ffn.0.diff_b": r(128),
        "diffusion_model.head.head.diff": r(64, 64, scale=0.1),
    }
    folder.mkdir(parents=True, exist_ok=True)
    save_file(original, str(folder / "bw_native_original.safetensors"))
    layers = {name: LoraLayer(down=r(4, dit.get_submodule(name).in_features),
                              up=r(dit.get_submodule(name).out_features, 4), alpha=8.0)
              for name in ("blocks.0.attn1.to_v", "blocks.1.attn2.to_q", "blocks.0.ffn.net.0.proj")}
    save_lora(LoraWeights(layers=layers, diffs={"condition_embedder.text_projector.linear_1.weight": r(32, 64)}),
              folder / "bw_native_trained.safetensors")
    return {"original": "bw_native_original.safetensors", "trained": "bw_native_trained.safetensors"}


def test_native_lora_loader_matches_our_lora_node(server):
    """LoraLoaderModelOnly on the native MODEL (ComfyUI's own key mapping and patching) gives our LoRA node's
    latents, for an original-layout Wan LoRA and a trainer file; both equal the core's apply_lora."""
    import copy

    import torch
    from build_workflows import _cases, node
    from PIL import Image

    from bindweave_core.lora import apply_lora, load_lora
    from bindweave_core.pipeline import BindWeavePipeline, GenerationSettings

    files = _lora_files(server["base"] / "models" / "loras")
    seed, steps, strength = 99, 2, 0.7
    g = copy.deepcopy(_cases()["bindweave_smoke_test"]["graph"])
    g["30"]["inputs"].update(sampler="euler", steps=steps, seed=seed)
    for key in ("31", "40", "41", "23", "24"):
        del g[key]
    g["50"] = node("SaveLatent", samples=["30", 0], filename_prefix="native_lora/plain")
    g["60"] = node("BindWeaveNativeModel", model=["1", 0])
    g["61"] = node("BindWeaveConditioning", text_conditioning=["21", 0], references=["22", 0],
                   planner_conditioning=["20", 0])
    for i, (kind, name) in enumerate(files.items()):
        b = str(7 + i)
        g[b + "0"] = node("BindWeaveLoraLoader", model=["1", 0], lora_name=name, strength=strength)
        g[b + "1"] = node("BindWeaveSampler", **{**g["30"]["inputs"], "model": [b + "0", 0]})
        g[b + "2"] = node("SaveLatent", samples=[b + "1", 0], filename_prefix=f"native_lora/ours_{kind}")
        g[b + "3"] = node("LoraLoaderModelOnly", model=["60", 0], lora_name=name, strength_model=strength)
        sampled = _custom_sampling(g, [b + "3", 0], ["61"], steps, 3.0, 5.0, seed, "euler", 20 + i)
        g[b + "4"] = node("SaveLatent", samples=[sampled, 0], filename_prefix=f"native_lora/native_{kind}")
    log_start = len((server["base"] / "comfyui.log").read_text())
    out = _run(server, g)
    log = (server["base"] / "comfyui.log").read_text()[log_start:]
    assert "lora key not loaded" not in log and "NOT LOADED" not in log, log[-2000:]

    pipe = BindWeavePipeline.smoke(seed=0)
    sampler, refs, image = g["30"]["inputs"], g["22"]["inputs"], g["10"]["inputs"]
    colour = image["color"]
    reference = Image.new("RGB", (image["width"], image["height"]), ((colour >> 16) & 255, (colour >> 8) & 255,
                                                                      colour & 255))
    settings = GenerationSettings(prompt=g["20"]["inputs"]["prompt"], width=refs["width"], height=refs["height"],
                                  num_frames=refs["length"], steps=steps, guidance=sampler["guidance"],
                                  shift=sampler["shift"], sampler="euler", seed=seed)
    plain = _normalised(_saved_latent(server, out, "50"), _tiny_vae_stats())
    dit = pipe.component("dit")
    original_weights = {k: v.clone() for k, v in dit.state_dict().items()}
    for i, (kind, name) in enumerate(files.items()):
        b = str(7 + i)
        ours = _normalised(_saved_latent(server, out, b + "2"), _tiny_vae_stats())
        native = _normalised(_saved_latent(server, out, b + "4"), _wan21_stats())
        dit.load_state_dict(original_weights)
        apply_lora(dit, load_lora(server["base"] / "models" / "loras" / name), strength=strength)
        core = pipe.generate([reference], settings).latents
        print(f"{kind} LoRA: effect {(ours - plain).abs().max():.3f}; native vs our node "
              f"{(native - ours).abs().max():.2e}; our node vs core {(ours - core).abs().max():.2e}")
        assert (ours - plain).abs().max() > 1e-2  # the LoRA matters
        torch.testing.assert_close(native, ours, rtol=0, atol=1e-4)
        torch.testing.assert_close(ours, core, rtol=0, atol=1e-4)


def _native_patch_graph() -> dict:
    from build_workflows import native_graph

    g = native_graph(refs=None, prompt="a man waves at the camera", width=64, height=48, length=5, steps=3,
                     guidance=5.0, shift=3.0, sampler="euler", seed=5, smoke=True)
    for key in ("34", "35", "40", "41", "23", "24"):
        del g[key]
    return g


def test_native_model_patches_attach_and_run(server):
    """ModelSamplingSD3, KSamplerAdvanced and TorchCompileModel on the native MODEL: each attaches and samples
    (TorchCompileModel: one step, guidance 1, to keep compile short)."""
    from build_workflows import node

    g = _native_patch_graph()
    del g["33"]  # the graph's own KSampler: the nodes below sample instead
    g["52"] = node("KSamplerAdvanced", model=["29", 0], add_noise="enable", noise_seed=5, steps=2, cfg=5.0,
                   sampler_name="euler", scheduler="simple", positive=["32", 0], negative=["32", 1],
                   latent_image=["32", 2], start_at_step=0, end_at_step=10000, return_with_leftover_noise="disable")
    g["53"] = node("SaveLatent", samples=["52", 0], filename_prefix="native_patches/advanced")
    g["54"] = node("TorchCompileModel", model=["29", 0], backend="inductor")
    g["55"] = node("KSampler", model=["54", 0], positive=["32", 0], negative=["32", 1], latent_image=["32", 2],
                   seed=5, steps=1, cfg=1.0, sampler_name="euler", scheduler="simple", denoise=1.0)
    g["56"] = node("SaveLatent", samples=["55", 0], filename_prefix="native_patches/compiled")
    t0 = time.time()
    out = _run(server, g, timeout=900)
    print(f"KSamplerAdvanced + TorchCompileModel graph: {time.time() - t0:.0f} s")
    for key in ("53", "56"):
        latents = _saved_latent(server, out, key)
        assert latents.shape == (1, 16, 2, 6, 8) and latents.isfinite().all()


def test_easycache_attaches_to_the_native_model(server):
    """EasyCache (ComfyUI's step cache) on the native MODEL skips DiT evaluations and samples."""
    from build_workflows import node

    if "EasyCache" not in server["object_info"]:
        pytest.skip("this ComfyUI has no EasyCache node (comfy_extras/nodes_easycache.py)")
    g = _native_patch_graph()
    g["50"] = node("EasyCache", model=["29", 0], reuse_threshold=0.2, start_percent=0.0, end_percent=1.0,
                   verbose=True)
    g["33"]["inputs"]["model"] = ["50", 0]
    g["51"] = node("SaveLatent", samples=["33", 0], filename_prefix="native_patches/easycache")
    log_start = len((server["base"] / "comfyui.log").read_text())
    out = _run(server, g, timeout=900)
    log = (server["base"] / "comfyui.log").read_text()[log_start:]
    assert "EasyCache - skipped" in log, log[-2000:]
    latents = _saved_latent(server, out, "51")
    assert latents.shape == (1, 16, 2, 6, 8) and latents.isfinite().all()


_NATIVE_VAE_SCRIPT = r'''
import sys
vae_path, repo = sys.argv[1], sys.argv[2]
sys.argv = [sys.argv[0], "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
sys.path.insert(0, repo)
import torch
import comfy.sd, comfy.utils
from bindweave_core.encoders.vae import WAN21_VAE_CONFIG, WanVAE
from nodes.native_inputs import wan_vae_from_native

native = comfy.sd.VAE(sd=comfy.utils.load_torch_file(vae_path))
ours = wan_vae_from_native(native)
loaded = WanVAE.load(vae_path, dtype=torch.float32)  # Load BindWeave VAE on the same file
x = torch.rand(1, 3, 5, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
with torch.no_grad():
    mu = ours.model.to(torch.float32).encode(x).latent_dist.mode()
    assert torch.equal(mu, loaded.model.encode(x).latent_dist.mode())
    assert torch.equal(ours.model.decode(mu).sample, loaded.model.decode(mu).sample)
assert ours.model.config.latents_mean == WAN21_VAE_CONFIG["latents_mean"]
shared = native.first_stage_model.state_dict()["encoder.conv1.weight"].data_ptr()
assert ours.model.encoder.conv_in.weight.data_ptr() == shared  # no second copy of the weights
print("ok")
'''


def test_reference_encode_takes_comfyuis_own_vae(server, wan_vae_file):
    """ComfyUI's VAELoader output into Reference Encode: our WanVAE over the same tensors (no copy) encodes and
    decodes exactly as Load BindWeave VAE does on that file, and a graph with it runs."""
    import copy

    from build_workflows import _cases, node

    path = server["base"] / "models" / "vae" / wan_vae_file
    run = subprocess.run([PYTHON, "-c", _NATIVE_VAE_SCRIPT, str(path), str(REPO)], cwd=COMFYUI, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": COMFYUI})
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]

    g = copy.deepcopy(_cases()["bindweave_smoke_test"]["graph"])
    g["30"]["inputs"]["seed"] = 4242
    g["7"] = node("VAELoader", vae_name=wan_vae_file)
    g["22"]["inputs"]["vae"] = ["7", 0]
    for key in ("31", "40", "41"):
        del g[key]
    g["50"] = node("SaveLatent", samples=["30", 0], filename_prefix="native_vae/ours")
    out = _run(server, g)
    assert _saved_latent(server, out, "50").isfinite().all()


# ------------------------------------------------------------------------------------------ ComfyUI's own loaders
def test_comfyuis_own_encoders_give_our_numbers(tmp_path):
    """ComfyUI's CLIP vision, UMT5 CLIP and Qwen2.5-VL CLIP as our encoders equal our loaders on the same file
    (ComfyUI's model classes built tiny in ComfyUI's interpreter; see tests/comfy_native_encoders.py)."""
    run = subprocess.run([PYTHON, str(REPO / "tests/comfy_native_encoders.py"), str(REPO), str(tmp_path)], cwd=COMFYUI,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": COMFYUI}, timeout=600)
    print(run.stdout)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout[-2000:] + run.stderr[-3000:]
    assert run.stdout.count("max |diff|") == 6


def test_decode_takes_comfyuis_own_vae(server, wan_vae_file):
    """BindWeave Decode on ComfyUI's Load VAE gives the frames of Load BindWeave VAE on the same file."""
    import copy

    from build_workflows import _cases, node

    g = copy.deepcopy(_cases()["bindweave_smoke_test"]["graph"])
    g["30"]["inputs"]["seed"] = 777
    for key in ("40", "41"):
        del g[key]
    g["2"]["inputs"]["vae_name"] = wan_vae_file  # our VAE loader on the file ComfyUI's VAE Loader reads
    g["7"] = node("VAELoader", vae_name=wan_vae_file)
    g["50"] = node("SaveImage", images=["31", 0], filename_prefix="decode_vae/ours")
    g["51"] = node("BindWeaveDecode", vae=["7", 0], samples=["30", 0], tiled=False, fps=16.0)
    g["52"] = node("SaveImage", images=["51", 0], filename_prefix="decode_vae/comfy")
    out = _run(server, g)
    ours, comfy = _saved_frames(server, out, "50"), _saved_frames(server, out, "52")
    print(f"Decode on ComfyUI's VAE vs ours: max |diff| {abs(ours - comfy).max() * 255:.0f}/255")
    # the same weights; the LATENT's round trip through the VAE statistics differs in the last float bit (this tiny
    # file's statistics are not the Wan 2.1 ones that ComfyUI's VAE carries), which can flip an 8-bit rounding
    assert ours.shape == comfy.shape and abs(ours - comfy).max() <= 1 / 255 + 1e-6


def _legacy_wiring(g: dict) -> dict:
    """The graph as saved before BindWeave References: the images connected to each node's own sockets."""
    refs = g.pop("15")["inputs"]
    for key in ("20", "22"):
        if key in g:
            del g[key]["inputs"]["reference_images"]
            g[key]["inputs"].update({k: v for k, v in refs.items() if k.startswith("image_")})
    return g


def test_references_wired_once_and_the_old_wiring_give_the_same_latents(server):
    import copy

    import torch
    from build_workflows import _cases, node

    g = copy.deepcopy(_cases()["bindweave_smoke_test"]["graph"])
    g["30"]["inputs"]["seed"] = 99
    for key in ("31", "40", "41"):
        del g[key]
    g["50"] = node("SaveLatent", samples=["30", 0], filename_prefix="wiring/once")
    once = _saved_latent(server, _run(server, g), "50")
    old = _legacy_wiring(copy.deepcopy(g))
    old["50"]["inputs"]["filename_prefix"] = "wiring/old"
    assert "15" not in old and old["22"]["inputs"]["image_1"] == ["10", 0]
    legacy = _saved_latent(server, _run(server, old), "50")
    torch.testing.assert_close(legacy, once, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ stated conditioning
def _run_error(server, prompt: dict, timeout: float = 300) -> str:
    """Queue an API prompt that must fail at run time: ``"<exception type>: <message> (node <type>)"``."""
    status = _finished(server, prompt, timeout)["status"]
    errors = [m[1] for m in status["messages"] if m[0] == "execution_error"]
    assert status["status_str"] == "error" and len(errors) == 1, status
    return f"{errors[0]['exception_type']}: {errors[0]['exception_message']} (node {errors[0]['node_type']})"


def test_more_masks_than_images_is_refused(server):
    import copy

    from build_workflows import _cases, node

    g = copy.deepcopy(_cases()["bindweave_smoke_test"]["graph"])
    g["30"]["inputs"]["seed"] = 5150  # not a cached run
    g["12"] = node("SolidMask", value=1.0, width=96, height=128)
    g["15"]["inputs"]["mask_1"] = ["12", 0]
    g["15"]["inputs"]["mask_2"] = ["12", 0]
    message = _run_error(server, g)
    print(message)
    assert "mask_2 is connected but image_2 is not" in message and "BindWeaveReferences" in message


def test_ksampler_with_block_offload_gives_the_unswapped_latents(server):
    """Load BindWeave DiT's resident_blocks (1 of the 2 tiny blocks resident) under KSampler, through ComfyUI's
    memory manager, gives the latents of the same graph without offload."""
    import copy

    import torch
    from build_workflows import native_graph, node

    g = native_graph(refs=None, prompt="a man waves at the camera", width=64, height=48, length=5, steps=3,
                     guidance=5.0, shift=3.0, sampler="euler", seed=2024, smoke=True, prefix="offload/ksampler")
    for key in ("34", "35", "40", "41"):
        del g[key]
    g["50"] = node("SaveLatent", samples=["33", 0], filename_prefix="offload/whole")
    g["60"] = copy.deepcopy(g["1"])
    g["60"]["inputs"]["resident_blocks"] = 1
    g["61"] = node("BindWeaveNativeModel", model=["60", 0])
    g["62"] = node("ModelSamplingSD3", model=["61", 0], shift=3.0)
    g["63"] = copy.deepcopy(g["33"])
    g["63"]["inputs"]["model"] = ["62", 0]
    g["64"] = node("SaveLatent", samples=["63", 0], filename_prefix="offload/streamed")
    log_start = len((server["base"] / "comfyui.log").read_text())
    out = _run(server, g)
    whole, streamed = _saved_latent(server, out, "50"), _saved_latent(server, out, "64")
    print(f"KSampler with resident_blocks 1 vs -1: max |diff| {(streamed - whole).abs().max():.2e}")
    torch.testing.assert_close(streamed, whole, rtol=0, atol=1e-5)
    log = (server["base"] / "comfyui.log").read_text()[log_start:]
    assert "DiT block offload: 1 of 2 blocks resident" in log, log[-2000:]


def test_kaleido_workflow_without_its_folder_is_stopped_naming_it(server):
    """The Kaleido DiT folder cannot be in the frontend's missing-models list (README); queuing its workflow
    without the folder stops before anything runs, ComfyUI naming the loader's missing entry."""
    import urllib.error

    from build_workflows import _cases

    prompt = _cases()["kaleido_two_subjects"]["graph"]
    request = urllib.request.Request(server["url"] + "/prompt", data=json.dumps({"prompt": prompt}).encode(),
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    body = json.loads(refused.value.read())
    errors = body["node_errors"]["1"]["errors"]
    print(errors)
    assert any("not in list" in e["message"].lower() or "not in list" in e.get("details", "").lower()
               for e in errors)
    assert any(f"{MODEL_FOLDER}/Kaleido-14B-S2V/" in e.get("details", "") for e in errors)


def test_graph_on_comfyuis_own_models_equals_the_graph_on_our_loaders(server, wan_vae_file):
    """The same sampling on ComfyUI's own loaded models (Load VAE; ComfyUI's CLIP vision and UMT5 CLIP classes,
    built at the tiny size by a test node) and on our loaders with the same files: equal latents."""
    import copy

    import torch
    from build_workflows import _cases, node
    from comfy_native_encoders import write_tiny_clip_vision, write_tiny_umt5

    for folder, name, write in (("clip_vision", "bw_tiny_clip_vision.safetensors", write_tiny_clip_vision),
                                ("text_encoders", "bw_tiny_umt5.safetensors", write_tiny_umt5)):
        (server["base"] / "models" / folder).mkdir(parents=True, exist_ok=True)
        write(server["base"] / "models" / folder / name)
    ours = copy.deepcopy(_cases()["bindweave_smoke_test"]["graph"])
    for key in ("31", "40", "41"):
        del ours[key]
    ours["30"]["inputs"]["seed"] = 8080
    ours["2"]["inputs"]["vae_name"] = wan_vae_file
    ours["3"]["inputs"]["text_encoder_name"] = "bw_tiny_umt5.safetensors"
    ours["4"]["inputs"]["clip_name"] = "bw_tiny_clip_vision.safetensors"
    for key in ("2", "3", "4"):
        ours[key]["inputs"]["dtype"] = "fp32"
    ours["50"] = node("SaveLatent", samples=["30", 0], filename_prefix="comfy_models/ours")
    comfy = copy.deepcopy(ours)
    comfy["2"] = node("VAELoader", vae_name=wan_vae_file)
    comfy["3"] = node("TinyComfyUMT5Loader", clip_name="bw_tiny_umt5.safetensors")
    comfy["4"] = node("TinyComfyCLIPVisionLoader", clip_name="bw_tiny_clip_vision.safetensors")
    comfy["50"]["inputs"]["filename_prefix"] = "comfy_models/comfy"
    a = _saved_latent(server, _run(server, ours), "50")
    b = _saved_latent(server, _run(server, comfy), "50")
    print(f"graph on ComfyUI's models vs on our loaders: max |diff| {(a - b).abs().max():.2e}")
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


def test_evaluate_node_scores_the_smoke_video_and_shows_its_plot(server):
    """BindWeave Evaluate on the smoke workflow's decoded frames: it runs in ComfyUI, shows its plot on the
    node (a preview image in the temp folder), and its report is the core's, windows included."""
    import copy

    from build_workflows import _cases, node
    from PIL import Image

    g = copy.deepcopy(_cases()["bindweave_smoke_test"]["graph"])
    for key in ("40", "41"):
        del g[key]
    g["60"] = node("BindWeaveEvaluate", frames=["31", 0], clip_vision=["4", 0], image_1=["10", 0], samples=32,
                   regions=False, prompt="a man waves", windows="0:3, 2:5", dino_dir="", face_model_dir="")
    g["61"] = node("PreviewAny", source=["60", 2])
    g["62"] = node("PreviewImage", images=["60", 0])
    out = _run(server, g)
    shown = out["60"]["images"]
    assert len(shown) == 1 and shown[0]["type"] == "temp"
    plot = Image.open(server["base"] / "temp" / shown[0]["subfolder"] / shown[0]["filename"])
    assert plot.size == (1100, 640) and len(plot.convert("RGB").getcolors(1 << 16)) > 20  # drawn, not blank
    report = json.loads(out["61"]["text"][0])
    assert report["video"]["frames"] == 5 and report["prompt"]["text"] == "a man waves"
    assert [(w["start"], w["end"]) for w in report["windows"]] == [(0, 3), (2, 5)]
    assert set(report["metrics"]) == {"clip_i", "subject_consistency", "temporal_flickering", "motion_amplitude"}
    assert len(report["skipped"]) == 2



def _native_mismatch_graph(latent: dict | None = None, mode: str = "bindweave") -> dict:
    """The native smoke graph (KSampler) made for 5 frames at 64x48, with another latent or reference mode."""
    from build_workflows import native_graph, node

    g = native_graph(refs=None, prompt="a man waves", width=64, height=48, length=5, steps=2, guidance=5.0,
                     shift=3.0, sampler="euler", seed=1, smoke=True, prefix="mismatch/video")
    for key in ("34", "35", "40", "41"):
        g.pop(key, None)
    g["36"] = node("SaveLatent", samples=["33", 0], filename_prefix="mismatch/latent")
    if latent is not None:
        g["37"] = latent
        g["33"]["inputs"]["latent_image"] = ["37", 0]
    if mode != "bindweave":
        g["22"]["inputs"]["mode"] = mode
    return g


@pytest.mark.parametrize("case", ["longer_video_latent", "sd_image_latent", "kaleido_references"])
def test_native_route_refuses_a_latent_or_references_the_conditioning_was_not_made_for(server, case):
    """Native MODEL + BindWeave Conditioning made for 5 frames: a 17-frame video latent, an SD image latent and
    Kaleido references into the BindWeave DiT each stop with one message naming both sides (before: the first
    ran with misaligned slots, the second 'succeeded', the third was a raw conv RuntimeError); the server
    then runs a correct graph."""
    from build_workflows import node

    latent, mode, expected = {
        "longer_video_latent": (node("EmptyHunyuanLatentVideo", width=64, height=48, length=17, batch_size=1),
                                "bindweave", "17 frames (5 latent) at 64x48"),
        "sd_image_latent": (node("EmptyLatentImage", width=64, height=48, batch_size=1), "bindweave",
                            "at 64x48"),
        "kaleido_references": (None, "kaleido", "kaleido references"),
    }[case]
    message = _run_error(server, _native_mismatch_graph(latent, mode))
    print(f"{case}: {message}")
    assert "InputError: " in message and expected in message, message
    if case != "kaleido_references":
        assert "made for 5 frames (2 latent) at 64x48" in message, message
    assert _saved_latent(server, _run(server, _native_mismatch_graph()), "36").shape == (1, 16, 2, 6, 8)


# ------------------------------------------------------------------------------------------ context windows
def test_native_context_windows_match_our_sampler(server):
    """17 frames (5 latent) in windows of 9 (3 latent) overlapping 4: the native MODEL with ComfyUI's
    WanContextWindowsManual through SamplerCustomAdvanced (BindWeave Noise/Sigmas, euler) equals our Sampler
    with the same windows (the references are in every window, each window gets the video condition of its
    length); the same windows with KSampler run and write the video's 17 frames."""
    import copy

    import torch
    from build_workflows import _cases, native_graph, node, wan_context_windows

    seed, steps, length = 321, 2, 17
    g = copy.deepcopy(_cases()["bindweave_smoke_test"]["graph"])
    g["22"]["inputs"]["length"] = length
    g["30"]["inputs"].update(sampler="euler", steps=steps, seed=seed, context_frames=9, context_overlap=4,
                             context_schedule="standard_static", context_fuse="pyramid")
    for key in ("31", "40", "41"):
        del g[key]
    g["50"] = node("SaveLatent", samples=["30", 0], filename_prefix="windows/ours")
    g["60"] = node("BindWeaveNativeModel", model=["1", 0])
    g["62"] = wan_context_windows(["60", 0], (9, 4))
    g["61"] = node("BindWeaveConditioning", text_conditioning=["21", 0], references=["22", 0],
                   planner_conditioning=["20", 0])
    sampled = _custom_sampling(g, ["62", 0], ["61"], steps, 3.0, 5.0, seed, "euler", 7)
    g["80"] = node("SaveLatent", samples=[sampled, 0], filename_prefix="windows/custom")
    native = native_graph(refs=None, prompt=g["20"]["inputs"]["prompt"], width=64, height=48, length=length,
                          steps=steps, guidance=5.0, shift=3.0, sampler="euler", seed=seed, smoke=True,
                          prefix="windows/ksampler", context=(9, 4))
    for key in ("34", "35", "40", "41"):
        native.pop(key, None)
    native["36"] = node("SaveLatent", samples=["33", 0], filename_prefix="windows/ksampler")
    g.update({k: v for k, v in native.items() if k not in g})
    out = _run(server, g)

    ours = _normalised(_saved_latent(server, out, "50"), _tiny_vae_stats())
    custom = _normalised(_saved_latent(server, out, "80"), _wan21_stats())
    print(f"windows: native vs our Sampler: max |diff| {(custom - ours).abs().max():.2e} "
          f"(latents up to {ours.abs().max():.2f})")
    assert ours.shape == (1, 16, 5, 6, 8)
    torch.testing.assert_close(custom, ours, rtol=0, atol=1e-4)
    ksampler = _saved_latent(server, out, "36")
    assert ksampler.shape == (1, 16, 5, 6, 8) and ksampler.isfinite().all()

"""The node layer without ComfyUI: the node specs, the tensor conversions, packaging for ComfyUI."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import tomllib
import torch

from bindweave_core.errors import InputError
from helpers import REPO
from nodes.convert import collect_references, latent_output, latent_stats, latents_from, normalise
from nodes.specs import ALL_SPECS, SPECS, WIDGET_KINDS


def test_node_ids_are_prefixed_unique_and_documented():
    ids = [s.node_id for s in ALL_SPECS]
    assert len(ids) == len(set(ids)) == 17
    for spec in ALL_SPECS:
        assert spec.node_id.startswith("BindWeave") and spec.category.startswith("BindWeave")
        assert len(spec.description) > 40, spec.node_id
        names = [i.name for i in spec.inputs]
        assert len(names) == len(set(names)), spec.node_id
        for i in spec.inputs:
            assert i.tooltip and len(i.tooltip) > 10, f"{spec.node_id}.{i.name} has no tooltip"
            assert i.kind in WIDGET_KINDS or (i.kind == "socket" and i.type), (spec.node_id, i.name)
            if i.options:
                assert i.default in i.options, (spec.node_id, i.name)
            if i.kind in ("int", "float"):
                assert i.min <= i.default <= i.max, (spec.node_id, i.name)
        for o in spec.outputs:
            assert o.tooltip and o.name, spec.node_id


def test_defaults_are_the_official_settings():
    sampler = {i.name: i.default for i in SPECS["BindWeaveSampler"].inputs}
    assert (sampler["steps"], sampler["guidance"], sampler["shift"], sampler["sampler"]) == (50, 5.0, 3.0, "unipc")
    refs = {i.name: i.default for i in SPECS["BindWeaveReferenceEncode"].inputs}
    assert (refs["width"], refs["height"], refs["length"], refs["mask_mode"]) == (1280, 720, 81, "rectangle")
    assert {i.name: i.default for i in SPECS["BindWeaveDecode"].inputs}["fps"] == 16.0
    assert {i.name: i.default for i in SPECS["BindWeaveDiTLoader"].inputs}["attention"] == "sdpa"


# number widgets that are not generation settings (no GenerationSettings field behind them)
NOT_SETTINGS = {("BindWeaveDiTLoader", "resident_blocks"), ("BindWeaveLoraLoader", "strength")}


def test_node_widgets_take_their_bounds_from_the_settings_validator():
    """Each number widget of a generation setting has the validator's min/max; its ends are accepted by the
    validator and one step beyond them refused (so the node and the core never disagree)."""
    from bindweave_core.setting_bounds import SETTINGS, check_setting

    seen = set()
    for spec in ALL_SPECS:
        for i in spec.inputs:
            if i.kind not in ("int", "float") or (spec.node_id, i.name) in NOT_SETTINGS:
                continue
            assert i.setting, f"{spec.node_id}.{i.name} takes no bounds from bindweave_core.setting_bounds"
            s = SETTINGS[i.setting]
            assert (i.min, i.max) == (s.min, s.max), (spec.node_id, i.name)
            assert check_setting(i.setting, i.min) == i.min and check_setting(i.setting, i.max) == i.max
            for outside in (i.min - 1, i.max + 1):
                with pytest.raises(InputError, match="must be"):
                    check_setting(i.setting, outside)
            seen.add(i.setting)
    assert seen == {"width", "height", "num_frames", "steps", "guidance", "shift", "seed", "refine_seed", "fps",
                    "step_cache"}


def test_every_loader_offers_the_smoke_model():
    for spec in ALL_SPECS:
        if spec.node_id.endswith("Loader") and spec.node_id != "BindWeaveLoraLoader":
            assert spec.inputs[0].smoke, spec.node_id


def image(h: int, w: int, batch: int = 1, value: float = 0.5) -> torch.Tensor:
    return torch.full((batch, h, w, 3), value)


def test_collect_references_expands_batches_in_order():
    a, b = image(10, 20, 2, 0.1), image(30, 40, 1, 0.9)
    refs, masks = collect_references([a, None, b, None])
    assert [r.shape for r in refs] == [(10, 20, 3), (10, 20, 3), (30, 40, 3)]
    assert refs[2][0, 0, 0] == pytest.approx(0.9) and masks is None


def test_collect_references_aligns_and_inverts_masks():
    a, b = image(4, 4, 2), image(6, 6)
    loadimage_mask = torch.zeros(1, 4, 4)
    loadimage_mask[0, :2] = 1.0  # Load Image: 1 where transparent
    refs, masks = collect_references([a, b], [loadimage_mask, None])
    assert len(masks) == 3 and masks[2] is None
    assert torch.equal(masks[0], 1 - loadimage_mask[0]) and torch.equal(masks[1], masks[0])
    _, raw = collect_references([a, b], [loadimage_mask, None], invert_masks=False)
    assert torch.equal(raw[0], loadimage_mask[0])


@pytest.mark.parametrize("images,masks,message", [
    ([image(4, 4, 5)], [], "5 reference images given; this model takes 1 to 4"),
    ([None, None], [], "0 reference images given"),
    ([None, image(4, 4)], [torch.ones(1, 4, 4)], "mask_1 is connected but image_1 is not"),
    ([image(4, 4, 3)], [torch.ones(2, 4, 4)], "mask_1 has 2 masks for 3 images"),
])
def test_collect_references_errors(images, masks, message):
    with pytest.raises(InputError, match=re.escape(message)):
        collect_references(images, masks)


def test_kaleido_mode_takes_at_most_three():
    with pytest.raises(InputError, match="takes 1 to 3"):
        collect_references([image(4, 4, 4)], max_references=3)


def test_latent_is_in_the_raw_vae_space_and_round_trips():
    """ComfyUI's convention (comfy/latent_formats.py Wan21.process_in: (x - mean) * scale / std): a LATENT
    holds raw VAE latents; the DiT's normalised ones are (raw - mean) / std with the VAE's statistics."""
    from bindweave_core.encoders.vae import WAN21_VAE_CONFIG

    x = torch.randn(1, 16, 3, 4, 6)
    mean, std = latent_stats({})
    assert (mean, std) == (WAN21_VAE_CONFIG["latents_mean"], WAN21_VAE_CONFIG["latents_std"])
    raw = latents_from(latent_output(x, mean, std))
    assert torch.allclose(raw[0, 7], x[0, 7] * 2.0743 + 1.5508)  # channel 7 of the Wan 2.1 table
    torch.testing.assert_close(normalise(raw, mean, std), x, rtol=0, atol=1e-6)
    own = latent_stats({"latents_mean": [0.5] * 16, "latents_std": [2.0] * 16})
    torch.testing.assert_close(latent_output(x, *own)["samples"], x * 2 + 0.5)
    with pytest.raises(InputError, match="16-channel Wan video latents"):
        latents_from({"samples": torch.zeros(1, 4, 8, 8)})


def test_node_package_imports_without_comfyui():
    code = ("import sys, nodes, nodes.specs, nodes.convert\n"
            "assert not any(m.split('.')[0] in ('comfy', 'comfy_api', 'folder_paths') for m in sys.modules)\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_requirements_txt_matches_pyproject():
    """ComfyUI-Manager installs requirements.txt; pip installs pyproject: the same dependencies."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    reqs = [line.strip() for line in (REPO / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    assert sorted(reqs) == sorted(deps)


def test_node_docs_are_up_to_date():
    """docs/nodes.md is generated from the specs; regenerate it with python tools/node_docs.py."""
    result = subprocess.run([sys.executable, "tools/node_docs.py", "--check"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_encoder_loader_rows_name_encoders_whose_load_takes_their_options():
    """Each row of the encoder loader table gives an encoder class (the protocol of encoders/base.py) whose
    load() accepts every option the node passes it; the rows' specs are the nodes' specs."""
    import inspect

    from bindweave_core.encoders.base import Encoder
    from nodes.specs import ENCODER_LOADERS

    assert len(ENCODER_LOADERS) == 4 and len({r.node_id for r in ENCODER_LOADERS}) == 4
    for row in ENCODER_LOADERS:
        assert SPECS[row.node_id] == row.spec and row.spec.inputs[0].name == row.file_input
        encoder = row.encoder()
        assert issubclass(encoder, Encoder) and not inspect.isabstract(encoder), row.node_id
        accepted = set(inspect.signature(encoder.load).parameters)
        passed = {i.name for i in row.options} | ({"tokenizer_dir"} if row.comfy_tokenizer else set())
        assert {"dtype"} | passed <= accepted, (row.node_id, passed - accepted)
        assert row.spec.inputs[0].files == row.folders and row.spec.category == "BindWeave/loaders"


def test_loader_nodes_are_plain_classes_named_in_the_source():
    """Every node class is a class statement in comfy_nodes.py (a reader finds LoadPlanner by name): the
    encoder loaders subclass one base and name their row; nothing builds classes or imports by string."""
    import ast

    from nodes import specs

    tree = ast.parse((REPO / "nodes" / "comfy_nodes.py").read_text())
    classes = {c.name: c for c in tree.body if isinstance(c, ast.ClassDef)}
    rows = {}
    for name, cls in classes.items():
        if [ast.unparse(b) for b in cls.bases] == ["EncoderLoaderNode"]:
            (assign,) = [s for s in cls.body if isinstance(s, ast.Assign)]
            rows[name] = getattr(specs, ast.unparse(assign.value))
    assert rows == {"LoadVAE": specs.VAE_LOADER, "LoadTextEncoder": specs.TEXT_ENCODER_LOADER,
                    "LoadCLIPVision": specs.CLIP_VISION_LOADER, "LoadPlanner": specs.PLANNER_LOADER}
    calls = {ast.unparse(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    assert not calls & {"type", "importlib.import_module", "getattr", "__import__"}
    nodes_list = next(n for n in tree.body if isinstance(n, ast.AnnAssign) and ast.unparse(n.target) == "NODES")
    assert {ast.unparse(e) for e in nodes_list.value.elts} <= set(classes)


def test_auto_precision_tooltips_say_what_host_picks():
    """The dtype tooltip of every loader names the official bf16, the fallback of its kind and the CPU rule."""
    from nodes.specs import AUTO_PRECISION, ENCODER_LOADERS, LOAD_DIT

    for spec, kind in [(LOAD_DIT, "dit")] + [(row.spec, row.memory_kind) for row in ENCODER_LOADERS]:
        tooltip = {i.name: i for i in spec.inputs}["dtype"].tooltip
        fallback = AUTO_PRECISION[kind].fallback
        assert f"auto: bf16 (the official run's precision) on devices that support it, else {fallback}; " \
               "fp32 on CPU." in tooltip, spec.node_id

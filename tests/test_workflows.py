"""Static checks of the shipped workflows (no ComfyUI needed): every node type and widget exists."""

from __future__ import annotations

import json

import pytest

from bindweave_core.model_files import MODEL_FILES
from helpers import CORE_NODES, FRONTEND_ONLY_NODES, REPO
from nodes.specs import MODEL_FOLDER, SPECS

WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
REQUIRED = {"bindweave_single_subject", "bindweave_two_subjects", "bindweave_subject_background",
            "bindweave_fast_few_step", "bindweave_smoke_test", "bindweave_native_ksampler",
            "bindweave_native_lora_stack"}


def test_the_required_workflows_are_shipped():
    assert REQUIRED <= {p.stem for p in WORKFLOWS}


def expected_widget_count(node_type: str) -> int:
    if node_type in SPECS:
        return sum(2 if w.seed else 1 for w in SPECS[node_type].widgets())  # seed + "control after generate"
    return len((CORE_NODES | FRONTEND_ONLY_NODES)[node_type])


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_every_node_and_widget_exists(path):
    wf = json.loads(path.read_text())
    known = set(SPECS) | set(CORE_NODES) | set(FRONTEND_ONLY_NODES)
    files = {f.filename for f in MODEL_FILES}
    # directory downloads are listed by the loaders as "bindweave/<folder>/"
    files |= {f"{MODEL_FOLDER}/{f.filename.split(' (directory)')[0]}/" for f in MODEL_FILES
              if f.filename.endswith("(directory)")}
    for node in wf["nodes"]:
        assert node["type"] in known, f"{path.name}: unknown node type {node['type']}"
        values = node.get("widgets_values") or []
        assert len(values) == expected_widget_count(node["type"]), f"{path.name}: {node['type']} widgets {values}"
        spec = SPECS.get(node["type"])
        if spec is None:
            continue
        it = iter(values)
        for w in spec.widgets():
            value = next(it)
            if w.seed:
                assert next(it) in ("fixed", "increment", "decrement", "randomize")
            if w.kind == "combo" and w.options:
                assert value in w.options, f"{path.name}: {node['type']}.{w.name} = {value!r}"
            elif w.kind == "combo":  # a model file: a built-in choice or a file the README tells users to get
                assert value in w.smoke or value in files, f"{path.name}: {node['type']}.{w.name} = {value!r}"
            elif w.kind in ("int", "float"):
                assert isinstance(value, (int, float)) and (w.min is None or value >= w.min), (w.name, value)
                assert w.max is None or value <= w.max, (w.name, value)
            elif w.kind == "boolean":
                assert isinstance(value, bool)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_links_connect_existing_nodes_with_matching_types(path):
    wf = json.loads(path.read_text())
    nodes = {n["id"]: n for n in wf["nodes"]}
    for link_id, src, src_slot, dst, dst_slot, kind in wf["links"]:
        assert src in nodes and dst in nodes, f"link {link_id} dangles"
        assert nodes[src]["outputs"][src_slot]["type"] == kind
        assert nodes[dst]["inputs"][dst_slot]["link"] == link_id
        spec = SPECS.get(nodes[dst]["type"])
        if spec is not None:
            name = nodes[dst]["inputs"][dst_slot]["name"]
            declared = next(i for i in spec.inputs if i.name == name)
            assert declared.type == "" or kind in declared.type.split(",") or kind == "*", \
                f"{name}: {kind} into {declared.type}"


@pytest.mark.parametrize("path", [p for p in WORKFLOWS if "smoke" not in p.stem], ids=lambda p: p.stem)
def test_real_workflows_say_which_files_go_where(path):
    wf = json.loads(path.read_text())
    notes = [n for n in wf["nodes"] if n["type"] in FRONTEND_ONLY_NODES]
    assert notes, "a note with the model files"
    text = notes[0]["widgets_values"][0]
    loaders = [n for n in wf["nodes"] if n["type"].endswith("Loader")]
    for n in loaders:
        chosen = n["widgets_values"][0]
        if chosen.startswith(MODEL_FOLDER + "/"):  # a directory download: named in the note instead
            assert chosen.strip("/").split("/")[-1] in text
            continue
        entries = n["properties"]["models"]
        assert entries and all(e["url"].startswith("https://huggingface.co/") for e in entries)
        for e in entries:
            assert e["name"] in text and f"models/{e['directory']}/" in text


def test_smoke_workflow_needs_no_files():
    wf = json.loads((REPO / "workflows/bindweave_smoke_test.json").read_text())
    types = [n["type"] for n in wf["nodes"]]
    assert "LoadImage" not in types and "BindWeaveLoraLoader" not in types
    for n in wf["nodes"]:
        if n["type"] in SPECS and n["type"].endswith("Loader"):
            assert n["widgets_values"][0] in SPECS[n["type"]].inputs[0].smoke


LEGACY = REPO / "tests/data/legacy_wiring_bindweave_smoke_test.json"  # saved before BindWeave References


def _linked_inputs(wf: dict) -> list[tuple[str, str, str]]:
    nodes = {n["id"]: n for n in wf["nodes"]}
    return [(nodes[dst]["type"], nodes[dst]["inputs"][slot]["name"], kind) for _, _, _, dst, slot, kind in wf["links"]]


def test_a_graph_saved_with_the_old_wiring_still_fits_the_nodes():
    """The image sockets of Planner Encode and Reference Encode stay (optional), so an old graph's links and
    widget values still land on inputs of the right type."""
    wf = json.loads(LEGACY.read_text())
    linked = _linked_inputs(wf)
    assert ("BindWeavePlannerEncode", "image_1", "IMAGE") in linked
    for node_type, name, kind in linked:
        if node_type in SPECS:
            declared = next(i for i in SPECS[node_type].inputs if i.name == name)
            assert declared.type == "" or kind in declared.type.split(","), (node_type, name, kind)
    for node in wf["nodes"]:
        if node["type"] in SPECS:
            assert len(node["widgets_values"]) == expected_widget_count(node["type"]), node["type"]


def test_rewiring_an_old_graph_wires_the_references_once():
    import sys

    sys.path.insert(0, str(REPO / "tools"))
    from rewire_references import rewire

    wf = json.loads(LEGACY.read_text())
    assert rewire(wf)
    linked = _linked_inputs(wf)
    assert not [x for x in linked if x[1].startswith(("image_", "mask_")) and x[0] != "BindWeaveReferences"]
    assert ("BindWeaveReferences", "image_1", "IMAGE") in linked
    assert {x[0] for x in linked if x[1] == "reference_images"} == {"BindWeavePlannerEncode", "BindWeaveReferenceEncode"}
    nodes = {n["id"]: n for n in wf["nodes"]}
    for link_id, src, src_slot, dst, slot, _ in wf["links"]:
        assert nodes[dst]["inputs"][slot]["link"] == link_id and link_id in nodes[src]["outputs"][src_slot]["links"]
    assert not rewire(wf)  # once


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_shipped_workflows_wire_the_references_once(path):
    linked = _linked_inputs(json.loads(path.read_text()))
    assert not [x for x in linked if x[1].startswith(("image_", "mask_")) and x[0] != "BindWeaveReferences"]
    assert ("BindWeaveReferenceEncode", "reference_images", "BINDWEAVE_REFERENCE_IMAGES") in linked

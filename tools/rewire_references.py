"""Rewire a saved UI-format workflow to BindWeave References (the references wired once).

Graphs saved before BindWeave References connect each reference image (and mask) twice, to Planner Encode
and to Reference Encode. They still load and run; this tool turns one into the simpler wiring: one
BindWeave References node takes the images and masks (Reference Encode's, which carry the masks) and feeds
both nodes. The BindWeave nodes' input lists are rewritten in the order of the current node schemas (the
order the frontend saves), links keep their sources. Without a browser this is how the shipped workflows
were moved to the new wiring; ``tools/build_workflows.py`` builds the same graphs from scratch with one.

    python tools/rewire_references.py workflows/*.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nodes.specs import REFERENCE_ENCODE, REFERENCE_IMAGES, REFERENCE_IMAGES_NODE, SPECS, In  # noqa: E402

SOCKETS = tuple(f"image_{k}" for k in range(1, 5)) + tuple(f"mask_{k}" for k in range(1, 5))
NODE_WIDTH = 300


def _slot(i: In, link: int | None) -> dict:
    entry = {"localized_name": i.name, "name": i.name, "type": i.type if not i.is_widget else _widget_type(i),
             "link": link}
    if i.is_widget:
        entry["widget"] = {"name": i.name}
    elif i.optional:
        entry["shape"] = 7  # the frontend's mark of an optional socket
    return entry


def _widget_type(i: In) -> str:
    return {"int": "INT", "float": "FLOAT", "string": "STRING", "boolean": "BOOLEAN", "combo": "COMBO"}[i.kind]


def schema_inputs(node_type: str, links: dict[str, int]) -> list[dict]:
    """A BindWeave node's ``inputs`` as the frontend saves them: sockets (required, then optional), then widgets."""
    spec = SPECS[node_type]
    ordered = [i for i in spec.inputs if not i.optional] + [i for i in spec.inputs if i.optional]
    return [_slot(i, links.get(i.name)) for i in ordered if not i.is_widget] + \
           [_slot(i, links.get(i.name)) for i in ordered if i.is_widget]


def _relink(wf: dict) -> None:
    """Every link's target slot and every node's input list made consistent with each other."""
    nodes = {n["id"]: n for n in wf["nodes"]}
    for link in wf["links"]:
        target = nodes[link[3]]
        link[4] = next(k for k, i in enumerate(target["inputs"]) if i["link"] == link[0])


def rewire(wf: dict) -> bool:
    """Move ``wf`` to the References wiring in place; False when it has nothing to move."""
    nodes = {n["id"]: n for n in wf["nodes"]}
    encode = next((n for n in wf["nodes"] if n["type"] == REFERENCE_ENCODE.node_id), None)
    if encode is None or any(n["type"] == REFERENCE_IMAGES_NODE.node_id for n in wf["nodes"]):
        return False
    by_id = {link[0]: link for link in wf["links"]}
    users = [n for n in wf["nodes"] if n["type"] in ("BindWeavePlannerEncode", REFERENCE_ENCODE.node_id)]
    sources = {i["name"]: by_id[i["link"]] for i in encode["inputs"] if i["name"] in SOCKETS and i["link"]}
    invert = encode["widgets_values"][-1] if isinstance(encode["widgets_values"][-1], bool) else True
    dropped = {i["link"] for n in users for i in n["inputs"] if i["name"] in SOCKETS and i["link"]}
    for link_id in dropped:
        src = nodes[by_id[link_id][1]]
        for out in src["outputs"]:
            out["links"] = [x for x in (out.get("links") or []) if x != link_id] or None
    wf["links"] = [link for link in wf["links"] if link[0] not in dropped]

    next_link = max([link[0] for link in wf["links"]] + [wf.get("last_link_id", 0)] + list(dropped)) + 1
    ref_id = max(nodes) + 1
    new_links: dict[str, int] = {}
    for name, old in sources.items():  # image/mask sources -> References
        wf["links"].append([next_link, old[1], old[2], ref_id, 0, old[5]])
        nodes[old[1]]["outputs"][old[2]]["links"] = (nodes[old[1]]["outputs"][old[2]].get("links") or []) + [next_link]
        new_links[name] = next_link
        next_link += 1
    out_links = []
    for user in users:  # References -> Planner Encode and Reference Encode
        wf["links"].append([next_link, ref_id, 0, user["id"], 0, REFERENCE_IMAGES])
        kept = {i["name"]: i["link"] for i in user["inputs"] if i["link"] and i["name"] not in SOCKETS}
        user["inputs"] = schema_inputs(user["type"], {**kept, "reference_images": next_link})
        out_links.append(next_link)
        next_link += 1
    first = nodes[sources["image_1"][1]]
    wf["nodes"].append({
        "id": ref_id, "type": REFERENCE_IMAGES_NODE.node_id,
        "pos": [first["pos"][0] + first["size"][0] + 40, first["pos"][1]], "size": [NODE_WIDTH, 250], "flags": {},
        "order": first.get("order", 0) + 1, "mode": 0, "inputs": schema_inputs(REFERENCE_IMAGES_NODE.node_id, new_links),
        "outputs": [{"localized_name": "reference_images", "name": "reference_images", "type": REFERENCE_IMAGES,
                     "links": out_links}],
        "properties": {"Node name for S&R": REFERENCE_IMAGES_NODE.node_id}, "widgets_values": [invert]})
    wf["last_node_id"] = max(wf.get("last_node_id", 0), ref_id)
    wf["last_link_id"] = next_link - 1
    for n in wf["nodes"]:  # socket types of the current schemas (e.g. inputs that now also take ComfyUI's models)
        if n["type"] in SPECS and n["id"] != ref_id and n not in users:
            n["inputs"] = schema_inputs(n["type"], {i["name"]: i["link"] for i in n["inputs"] if i["link"]})
    _relink(wf)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", type=Path)
    for path in ap.parse_args().files:
        wf = json.loads(path.read_text())
        if rewire(wf):
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(wf, indent=1) + "\n")
            tmp.replace(path)
            print(f"rewired {path}")
        else:
            print(f"{path}: nothing to rewire")


if __name__ == "__main__":
    main()

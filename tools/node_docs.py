"""Write docs/nodes.md from the node specs (the single source of the nodes' inputs and tooltips).

    python tools/node_docs.py            # rewrite docs/nodes.md
    python tools/node_docs.py --check    # exit 1 if docs/nodes.md is out of date (used by the tests)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nodes.specs import ALL_SPECS, In  # noqa: E402

OUT = REPO / "docs" / "nodes.md"


def _default(i: In) -> str:
    if i.kind == "socket":
        return "" if not i.optional else "optional"
    if i.files:
        return "file: models/" + ", models/".join(i.files) + ("; built-in smoke model" if i.smoke else "")
    if i.kind == "string" and i.default and len(i.default) > 40:
        return "the official text"
    return f"`{i.default}`" if i.default not in (None, "") else ""


def render() -> str:
    lines = ["# BindWeave nodes", "",
             "Generated from `nodes/specs.py` by `python tools/node_docs.py`; the same descriptions and tooltips "
             "appear in ComfyUI when you hover a node or an input.", ""]
    for spec in ALL_SPECS:
        lines += [f"## {spec.display_name} (`{spec.node_id}`)", "", f"*{spec.category}*", "", spec.description, "",
                  "| input | type | default | what it does |", "| --- | --- | --- | --- |"]
        for i in spec.inputs:
            kind = i.type if i.kind == "socket" else i.kind.upper()
            lines.append(f"| `{i.name}` | {kind} | {_default(i)} | {i.tooltip} |")
        lines += ["", "| output | type | what it is |", "| --- | --- | --- |"]
        lines += [f"| `{o.name}` | {o.type} | {o.tooltip} |" for o in spec.outputs]
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is out of date: run python tools/node_docs.py")
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

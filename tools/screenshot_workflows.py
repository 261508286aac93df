"""Screenshot every workflow in workflows/ as loaded by a running ComfyUI's own frontend.

Fails if the frontend cannot resolve a node type (what ComfyUI shows as a red "missing node" box).
Reference images for the Load Image nodes can be uploaded first (``--images DIR``).

    python tools/screenshot_workflows.py --server http://127.0.0.1:8188 --images ../shared/data/opens2v-samples/images
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

from comfy_browser import comfy_page, load_workflow, post_json  # noqa: E402


def upload_image(server: str, path: Path) -> None:
    """POST /upload/image (multipart) so Load Image nodes find the file."""
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{path.name}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + path.read_bytes() + \
        f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"overwrite\"\r\n\r\ntrue\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(f"{server}/upload/image", data=body, method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    urllib.request.urlopen(req).read()


def make_placeholders(workflows: list[Path], models_dir: Path) -> None:
    """Empty files named like the models the workflows use, so their loaders show no missing-file error."""
    sys.path.insert(0, str(REPO))
    from bindweave_core.model_files import MODEL_FILES

    texts = [p.read_text() for p in workflows]
    for f in MODEL_FILES:
        if f.filename.endswith("(directory)"):
            name = f.filename.split(" (directory)")[0]
            if any(f"/{name}/" in t for t in texts):
                (models_dir / f.comfy_folder / name).mkdir(parents=True, exist_ok=True)
        elif f.url and any(f.filename in t for t in texts):
            target = models_dir / f.comfy_folder / f.filename
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                target.touch()


async def shoot(server: str, workflows: list[Path], out_dir: Path) -> list[dict]:
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    # keep node text legible when the whole graph is in view (the default switches to low detail)
    post_json(f"{server}/settings/LiteGraph.Canvas.MinFontSizeForLOD", 1)
    post_json(f"{server}/settings/LiteGraph.Canvas.LowQualityRenderingZoomThreshold", 0.1)
    async with comfy_page(server, width=2400, height=1350) as page:
        for path in workflows:
            info = await load_workflow(page, json.loads(path.read_text()))
            await page.evaluate("() => app.extensionManager.command.execute('Comfy.Canvas.FitView')")
            await page.wait_for_timeout(1200)
            shot = out_dir / f"{path.stem}.png"
            await page.screenshot(path=str(shot))
            info.update(workflow=path.name, screenshot=str(shot.relative_to(REPO)) if shot.is_relative_to(REPO)
                        else str(shot))
            results.append(info)
            print(f"{path.name}: {info['count']} nodes, missing: {info['missing'] or 'none'} -> {shot}")
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--server", default="http://127.0.0.1:8188")
    ap.add_argument("--workflows", nargs="*", default=sorted(str(p) for p in (REPO / "workflows").glob("*.json")))
    ap.add_argument("--out", default=str(REPO / "docs" / "workflows"))
    ap.add_argument("--images", help="folder of reference images to upload first")
    ap.add_argument("--placeholder-models", help="a TEST server's models directory: create empty files named like "
                                                 "the workflows' models there (for screenshots without downloads)")
    args = ap.parse_args()
    if args.placeholder_models:
        make_placeholders([Path(p) for p in args.workflows], Path(args.placeholder_models))
    if args.images:
        for p in sorted(Path(args.images).iterdir()):
            if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"):
                upload_image(args.server, p)
    results = asyncio.run(shoot(args.server, [Path(p) for p in args.workflows], Path(args.out)))
    return 1 if any(r["missing"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())

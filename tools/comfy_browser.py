"""Drive a running ComfyUI server's own frontend in headless Chromium (Playwright).

Used by the workflow builder, the screenshot tool and the end-to-end test: the frontend is the one
authority on the UI workflow format, so workflows are converted and checked by it, not by us.
"""

from __future__ import annotations

import json
import shutil
import urllib.request
from contextlib import asynccontextmanager
from typing import Any

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def browser_available() -> str | None:
    """None if Playwright and a Chromium binary are available, else why not."""
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install playwright)"
    if chromium_path() is None:
        return "no chromium binary on PATH (apt-get install chromium)"
    return None


def post_json(url: str, data: Any, method: str = "POST") -> Any:
    req = urllib.request.Request(url, data=json.dumps(data).encode(), method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        body = r.read()
    return json.loads(body) if body else None


@asynccontextmanager
async def comfy_page(server: str, width: int = 1800, height: int = 1100):
    """A page with the ComfyUI app loaded and the first-run tutorial dismissed."""
    from playwright.async_api import async_playwright

    post_json(f"{server}/settings/Comfy.TutorialCompleted", True)
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": width, "height": height})
            await page.goto(server + "/")
            await page.wait_for_function("window.app && window.app.graph && window.LiteGraph", timeout=90_000)
            await page.wait_for_timeout(1500)
            yield page
        finally:
            await browser.close()


async def load_workflow(page, workflow: dict) -> dict:
    """Load a UI-format workflow; return which nodes the frontend could not resolve."""
    return await page.evaluate("""async (wf) => {
        await app.loadGraphData(wf, true, true, 'check');
        const nodes = app.graph._nodes;
        const missing = nodes.filter(n => !LiteGraph.registered_node_types[n.type]).map(n => n.type);
        return {count: nodes.length, missing};
    }""", workflow)


async def workflow_to_api(page, workflow: dict) -> dict:
    await load_workflow(page, workflow)
    return await page.evaluate("async () => (await app.graphToPrompt()).output")

"""ComfyUI nodes of the BindWeave pack (V3 schema), thin wrappers over ``bindweave_core``.

``specs`` and ``convert`` import no ComfyUI module (the tests use them); ``comfy_nodes`` and
``host`` do, and are only imported inside a ComfyUI process.
"""


async def comfy_entrypoint():
    from .comfy_nodes import comfy_entrypoint as entry

    return await entry()

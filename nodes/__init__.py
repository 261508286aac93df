"""ComfyUI nodes of the BindWeave pack (V3 schema), thin wrappers over ``bindweave_core``."""

from comfy_api.latest import ComfyExtension, io  # noqa: F401  (only imported inside ComfyUI)


class BindWeaveExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return []


async def comfy_entrypoint() -> ComfyExtension:
    return BindWeaveExtension()

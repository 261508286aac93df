"""ComfyUI entry point of the BindWeave node pack.

ComfyUI imports this folder as a package and calls ``comfy_entrypoint``. Imported anywhere else
(plain Python, pytest) it defines nothing, so the core library works without ComfyUI.
"""

try:
    import comfy_api  # noqa: F401  (present only inside a ComfyUI process)
except ImportError:
    comfy_api = None

if comfy_api is not None:
    from .nodes import comfy_entrypoint  # noqa: F401

    __all__ = ["comfy_entrypoint"]
else:
    __all__ = []

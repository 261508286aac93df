"""ComfyUI entry point of the BindWeave node pack.

ComfyUI imports this folder as a package and calls ``comfy_entrypoint``. Imported anywhere else
(plain Python, pytest) it defines nothing, so the core library works without ComfyUI.
"""

import importlib.util
import os
import sys

try:
    import comfy_api  # noqa: F401  (present only inside a ComfyUI process)
except ImportError:
    comfy_api = None

if comfy_api is not None:
    # A custom_nodes clone is not pip-installed: make the core library importable from here. Appended
    # (not prepended) so nothing of ComfyUI's own modules can be shadowed.
    if importlib.util.find_spec("bindweave_core") is None:
        sys.path.append(os.path.dirname(os.path.abspath(__file__)))
    from .nodes import comfy_entrypoint  # noqa: F401

    __all__ = ["comfy_entrypoint"]
else:
    __all__ = []

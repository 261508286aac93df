"""BindWeave core: a ComfyUI-independent library for multi-subject video generation.

Heavy submodules (models, pipeline) are imported on use; ``import bindweave_core`` stays light.
"""

__version__ = "0.1.0"

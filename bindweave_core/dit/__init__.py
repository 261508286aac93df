"""The BindWeave DiT (Wan2.1 transformer + connector + reference slots + R-RoPE positions)."""

from .transformer import BindWeaveTransformer, build_dit, connector_parameters, count_parameters

__all__ = ["BindWeaveTransformer", "build_dit", "count_parameters", "connector_parameters"]

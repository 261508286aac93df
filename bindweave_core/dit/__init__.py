"""The BindWeave DiT (Wan2.1 transformer + connector + reference slots + R-RoPE positions)."""

from .compile import compile_blocks
from .offload import disable_block_offload, enable_block_offload
from .parallel import enable_context_parallel
from .transformer import BindWeaveTransformer, build_dit, connector_parameters, count_parameters

__all__ = ["BindWeaveTransformer", "build_dit", "count_parameters", "connector_parameters", "compile_blocks",
           "enable_block_offload", "disable_block_offload", "enable_context_parallel"]

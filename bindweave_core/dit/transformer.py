"""The BindWeave DiT: diffusers' Wan2.1 transformer plus what the BindWeave weights expect.

Built on ``diffusers.WanTransformer3DModel`` (same modules, same key names, same blocks); this
subclass adds

* the connector ``condition_embedder.text_projector`` (Qwen states -> text_dim, spec section 1);
* the context assembly ``[img_emb(clip) ; text_emb([connector(qwen) ; t5])]`` (sections 4, 6);
* an attention processor whose image K/V stream sees only the first 257 context tokens (section 7),
  and which handles a batch whose text contexts have different lengths (cond + uncond batched)
  exactly, without padding tokens entering any softmax;
* the 4 reference slots: zero frames in front of the noise, dropped from the output (section 8);
* rotary embeddings from an explicit per-token position grid (section 9, and R-RoPE);
* the float64 timestep sinusoid of the official code (section 9b).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.embeddings import PixArtAlphaTextProjection, get_timestep_embedding
from diffusers.models.transformers.transformer_wan import WanTransformer3DModel
from torch import nn

from ..config import DiTConfig
from ..errors import InputError
from . import positions as P
from .attention import attention
from .parallel import CP_PLAN
from .rope import RotaryEmbedding3D, apply_rotary, prepare_rotary


class WanTimesteps(nn.Module):
    """Wan's timestep sinusoid ``[cos, sin](t * 10000^(-i/half))``.

    Computed in float64 as the official code does (spec 9b); ``float64=False`` gives diffusers'
    float32 numbers instead (they differ by ~1e-5 at the output).
    """

    def __init__(self, num_channels: int, max_period: float = 10000.0, float64: bool = True):
        super().__init__()
        self.num_channels = num_channels
        self.max_period = max_period
        self.float64 = float64

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        if not self.float64 or timesteps.device.type == "mps":  # mps has no float64
            return get_timestep_embedding(timesteps, self.num_channels, flip_sin_to_cos=True,
                                          downscale_freq_shift=0, max_period=self.max_period)
        half = self.num_channels // 2
        exponent = -torch.arange(half, dtype=torch.float64, device=timesteps.device) / half
        angles = timesteps.to(torch.float64)[:, None] * torch.pow(self.max_period, exponent)[None, :]
        return torch.cat([angles.cos(), angles.sin()], dim=-1).float()


@dataclass
class AttentionState:
    """Settings shared by every attention processor of one model (set per forward call)."""

    backend: str = "sdpa"
    image_kv_tokens: int = 257
    # [B, 1, 1, S_text] bool (True = a real token) for the text stream when batch items have different
    # context lengths, else None. A tensor, not a list of lengths: compiled blocks then depend on its
    # shape only, and do not recompile for every new planner length (built in ``forward``).
    context_mask: torch.Tensor | None = None
    parallel_config: Any = None


def _project_qkv(attn: nn.Module, hidden: torch.Tensor, context: torch.Tensor | None):
    if getattr(attn, "fused_projections", False):
        if context is None:
            return attn.to_qkv(hidden).chunk(3, dim=-1)
        return (attn.to_q(hidden), *attn.to_kv(context).chunk(2, dim=-1))
    source = hidden if context is None else context
    return attn.to_q(hidden), attn.to_k(source), attn.to_v(source)


def _project_image_kv(attn: nn.Module, image_context: torch.Tensor):
    if getattr(attn, "fused_projections", False):
        return attn.to_added_kv(image_context).chunk(2, dim=-1)
    return attn.add_k_proj(image_context), attn.add_v_proj(image_context)


class BindWeaveAttnProcessor:
    """Self- and cross-attention for ``diffusers.WanAttention`` modules, BindWeave style."""

    _attention_backend = None  # read by diffusers' enable_parallelism (we pick backends in dit.attention)

    def __init__(self, state: AttentionState):
        self.state = state

    @property
    def _parallel_config(self) -> Any:  # set by diffusers' enable_parallelism: self-attention gets it
        return self.state.parallel_config

    @_parallel_config.setter
    def _parallel_config(self, value: Any) -> None:
        self.state.parallel_config = value

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 rotary_emb=None, **kwargs):
        st = self.state
        heads = attn.heads
        image_context = None
        context = encoder_hidden_states
        if context is not None and attn.add_k_proj is not None:
            image_context = context[:, : st.image_kv_tokens]
            context = context[:, st.image_kv_tokens:]

        q, k, v = _project_qkv(attn, hidden_states, context)
        q = attn.norm_q(q).unflatten(2, (heads, -1))
        k = attn.norm_k(k).unflatten(2, (heads, -1))
        v = v.unflatten(2, (heads, -1))

        if rotary_emb is not None:
            rotary = prepare_rotary(rotary_emb)
            q = apply_rotary(q, *rotary)
            k = apply_rotary(k, *rotary)

        if context is None:
            out = attention(q, k, v, st.backend, parallel_config=st.parallel_config)
        else:
            # Items of different context lengths: each attends over its own valid tokens only (the
            # padding gets exactly zero weight), in one call.
            out = attention(q, k, v, st.backend, attn_mask=st.context_mask)

        if image_context is not None:
            k_img, v_img = _project_image_kv(attn, image_context)
            k_img = attn.norm_added_k(k_img).unflatten(2, (heads, -1))
            v_img = v_img.unflatten(2, (heads, -1))
            out = out + attention(q, k_img, v_img, st.backend)

        out = out.flatten(2, 3).type_as(q)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


def check_planner_width(width: int, planner_dim: int, text_dim: int) -> None:
    """Planner states enter the connector as the raw Qwen2.5-VL states (``planner_dim`` wide; spec sections 2
    and 4). The official code always runs the connector on them and has no path for states that are
    already projected (``text_dim`` wide), so those are refused rather than guessed at."""
    if width == planner_dim:
        return
    if width == text_dim:
        raise InputError(f"the planner states are {width} wide: that is the DiT's text width, i.e. states already "
                         f"through a connector. The DiT's connector takes the raw Qwen2.5-VL states ({planner_dim} "
                         "wide: the last hidden state after the final norm); pass those (the official code always "
                         "projects them itself).")
    raise InputError(f"the planner states are {width} wide; this DiT's connector takes {planner_dim}-wide Qwen2.5-VL "
                     "states. Encode the prompt with the planner that belongs to this DiT.")


class BindWeaveTransformer(WanTransformer3DModel):
    """Wan2.1 DiT with BindWeave conditioning; see the module docstring.

    Build it from a :class:`~bindweave_core.config.DiTConfig` (on the meta device for loading:
    ``with torch.device("meta"): BindWeaveTransformer(cfg)``).
    """

    _cp_plan = CP_PLAN  # diffusers' Wan plan minus its per-token timestep split (see dit.parallel)

    def __init__(self, config: DiTConfig):
        super().__init__(**config.diffusers_kwargs())
        self.dit_config = config
        emb = self.condition_embedder
        if config.planner_dim is not None:
            emb.text_projector = PixArtAlphaTextProjection(
                config.planner_dim, config.text_dim, config.text_dim, act_fn="gelu_tanh")
        emb.timesteps_proj = WanTimesteps(config.freq_dim)
        self.rope = RotaryEmbedding3D(config.head_dim)
        self.attention_state = AttentionState(image_kv_tokens=config.clip_token_len)
        self.set_attn_processor(BindWeaveAttnProcessor(self.attention_state))
        self._rope_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    # ----------------------------------------------------------------------------- settings
    @property
    def attention_backend(self) -> str:
        return self.attention_state.backend

    def set_attention_backend(self, backend: str) -> None:  # type: ignore[override]
        """``auto``, ``sdpa``, ``sage`` or ``flash`` (see :mod:`bindweave_core.dit.attention`)."""
        from .attention import BACKENDS

        if backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
        self.attention_state.backend = backend

    def set_timestep_precision(self, float64: bool) -> None:
        """float64 sinusoid (official, default) or float32 (diffusers' numbers)."""
        self.condition_embedder.timesteps_proj.float64 = float64

    # ----------------------------------------------------------------------------- context
    def embed_context(self, text_states: torch.Tensor, planner_states: torch.Tensor | None = None,
                      planner_lengths: list[int] | None = None, clip_tokens: torch.Tensor | None = None,
                      timestep: torch.Tensor | None = None):
        """Spec sections 4 and 6: the cross-attention context of every block.

        ``text_states [B, 512, text_dim]`` (UMT5, zero-padded), ``planner_states [B, L, planner_dim]``
        (raw Qwen states; with ``planner_lengths`` when items were padded to a common L),
        ``clip_tokens [B, N, image_dim]``. Returns ``(temb, timestep_proj, context, context_lengths)``
        where ``context = [img_emb(clip) ; text_emb([connector(qwen) ; t5])]`` and ``context_lengths``
        is None unless items have different valid lengths.
        """
        emb = self.condition_embedder
        batch = text_states.shape[0]
        text_lengths = None
        if planner_states is not None and planner_states.shape[1] > 0:
            if not hasattr(emb, "text_projector"):
                raise ValueError("this checkpoint has no connector (text_projector): it takes no planner states")
            check_planner_width(planner_states.shape[-1], emb.text_projector.linear_1.in_features,
                                self.dit_config.text_dim)
            projected = emb.text_projector(planner_states.to(text_states.dtype))
            if planner_lengths is None or len(set(planner_lengths)) == 1:
                n = planner_lengths[0] if planner_lengths is not None else projected.shape[1]
                text_in = torch.cat([projected[:, :n], text_states], dim=1)
            else:
                # Keep each item's planner tokens directly in front of its T5 tokens; pad at the end.
                total = max(planner_lengths) + text_states.shape[1]
                text_in = text_states.new_zeros(batch, total, text_states.shape[-1])
                for i, n in enumerate(planner_lengths):
                    text_in[i, : n + text_states.shape[1]] = torch.cat([projected[i, :n], text_states[i]], dim=0)
                text_lengths = [n + text_states.shape[1] for n in planner_lengths]
        else:
            text_in = text_states
        if timestep is None:
            timestep = torch.zeros(batch, device=text_states.device)
        if clip_tokens is not None and emb.image_embedder is None:
            raise ValueError("this checkpoint has no image embedder: it takes no CLIP tokens")
        temb, timestep_proj, text_ctx, image_ctx = emb(timestep, text_in, clip_tokens)
        if image_ctx is None:
            context = text_ctx
        else:
            context = torch.cat([image_ctx.to(text_ctx.dtype), text_ctx], dim=1)
            if text_lengths is not None:
                text_lengths = [image_ctx.shape[1] + n for n in text_lengths]
        return temb, timestep_proj.unflatten(1, (6, -1)), context, text_lengths

    # ----------------------------------------------------------------------------- positions
    def clear_rotary_cache(self) -> None:
        """Forget the cached (cos, sin) tables (e.g. after sharding the sequence over GPUs)."""
        self._rope_cache.clear()

    def rotary_for(self, key: tuple, positions: torch.Tensor | None, device: torch.device):
        """(cos, sin) for a layout ``key``; explicit ``positions`` bypass the cache."""
        if positions is not None:
            return self.rope(positions.to(device))
        cache_key = (key, str(device), self._parallel_config is not None)  # CP caches the rank's shard
        if cache_key not in self._rope_cache:
            kind, *dims = key
            grid = (P.slot_layout_positions(*dims) if kind == "grid" else P.rrope_layout_positions(*dims))
            self._rope_cache.clear()
            self._rope_cache[cache_key] = self.rope(grid.to(device))
        return self._rope_cache[cache_key]

    # ----------------------------------------------------------------------------- forward
    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                encoder_hidden_states_image: torch.Tensor | None = None, *,
                planner_states: torch.Tensor | None = None, planner_lengths: list[int] | None = None,
                condition: torch.Tensor | None = None, reference_latents: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the flow velocity of the video latents.

        Args:
            hidden_states: noisy video latents ``[B, 16, T, h, w]`` (without reference slots).
            timestep: ``[B]`` scheduler timesteps (0..1000).
            encoder_hidden_states: UMT5 states ``[B, 512, text_dim]``, zero past the real tokens.
            encoder_hidden_states_image: CLIP tokens ``[B, N, image_dim]`` (BindWeave: 1028 = 4x257,
                refs then zeros; plain Wan I2V: 257).
            planner_states: raw Qwen2.5-VL states ``[B, L, planner_dim]``; ``planner_lengths`` gives
                each item's valid L when the batch was padded to a common length.
            condition: VAE condition ``[B, 20, S + T, h, w]``: ``S`` reference slots then the video
                condition. Zero frames are put in front of the noise for the slots and the slots'
                predictions are dropped (spec section 8).
            reference_latents: R-RoPE mode only: clean reference latents ``[B, n, 16, h, w]``, placed
                in front of the video tokens at shifted positions; their outputs are dropped.
            positions: explicit ``[S_tokens, 3]`` rotary positions overriding the layout's grid.
        Returns:
            the predicted velocity of the video frames, ``[B, 16, T, h, w]``.
        """
        x = hidden_states
        batch, _, frames, height, width = x.shape
        p_t, p_h, p_w = self.config.patch_size
        slots = 0
        if condition is not None:
            slots = condition.shape[2] - frames
            if slots < 0 or condition.shape[-2:] != x.shape[-2:]:
                raise ValueError(f"condition {tuple(condition.shape)} does not fit latents {tuple(x.shape)}")
            if slots:
                x = torch.cat([x.new_zeros(batch, x.shape[1], slots, height, width), x], dim=2)
            x = torch.cat([x, condition.to(x.dtype)], dim=1)
        total_frames = frames + slots
        grid = (total_frames // p_t, height // p_h, width // p_w)

        dtype = self.patch_embedding.weight.dtype  # the compute dtype (never fp8: see bindweave_core.fp8)
        tokens = self.patch_embedding(x.to(dtype)).flatten(2).transpose(1, 2)
        num_ref_tokens = 0
        if reference_latents is not None:
            n_refs = reference_latents.shape[1]
            refs = reference_latents.flatten(0, 1).unsqueeze(2).to(dtype)  # [B*n, C, 1, h, w]
            ref_tokens = self.patch_embedding(refs).flatten(2).transpose(1, 2)
            ref_tokens = ref_tokens.reshape(batch, -1, ref_tokens.shape[-1])
            num_ref_tokens = ref_tokens.shape[1]
            tokens = torch.cat([ref_tokens, tokens], dim=1)
            layout = ("rrope", n_refs, grid[1], grid[2], grid[0])
        else:
            layout = ("grid", *grid)
        tokens = tokens.contiguous()
        rotary = self.rotary_for(layout, positions, tokens.device)

        if timestep.ndim == 0:
            timestep = timestep.expand(batch)
        temb, timestep_proj, context, context_lengths = self.embed_context(
            encoder_hidden_states.to(dtype), planner_states, planner_lengths,
            encoder_hidden_states_image.to(dtype) if encoder_hidden_states_image is not None else None,
            timestep=timestep)
        self.attention_state.context_mask = self.text_context_mask(context_lengths, context)

        tokens = self.run_blocks(tokens, context, timestep_proj, rotary)

        out = self.apply_head(tokens, temb)
        out = out[:, num_ref_tokens:]
        out = out.reshape(batch, grid[0], grid[1], grid[2], p_t, p_h, p_w, -1)
        out = out.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)
        return out[:, :, slots:]

    def text_context_mask(self, context_lengths: list[int] | None, context: torch.Tensor) -> torch.Tensor | None:
        """``[B, 1, 1, S_text]`` bool mask of each item's valid text-stream tokens (None: all valid)."""
        if context_lengths is None:
            return None
        skip = self.attention_state.image_kv_tokens if self.condition_embedder.image_embedder is not None else 0
        lengths = torch.tensor([n - skip for n in context_lengths], device=context.device)
        positions = torch.arange(context.shape[1] - skip, device=context.device)
        return (positions[None, :] < lengths[:, None])[:, None, None, :]

    def run_blocks(self, tokens: torch.Tensor, context: torch.Tensor, timestep_proj: torch.Tensor,
                   rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The transformer blocks (the one place offload/compile hooks wrap)."""
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            for block in self.blocks:
                tokens = self._gradient_checkpointing_func(block, tokens, context, timestep_proj, rotary)
        else:
            for block in self.blocks:
                tokens = block(tokens, context, timestep_proj, rotary)
        return tokens

    def apply_head(self, tokens: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """Output norm + modulation + projection, correct for any batch (spec 9b)."""
        shift, scale = (self.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
        normed = self.norm_out(tokens.float()) * (1 + scale) + shift
        return self.proj_out(normed.type_as(tokens))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def connector_parameters(model: BindWeaveTransformer) -> int:
    projector = getattr(model.condition_embedder, "text_projector", None)
    return 0 if projector is None else count_parameters(projector)


def build_dit(config: DiTConfig, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> BindWeaveTransformer:
    """Build a randomly initialised DiT (tests, benchmarks, the smoke model)."""
    with torch.device(device):
        model = BindWeaveTransformer(config)
    if dtype is not None:
        model.to(dtype)
    return model.eval()


"""A host's loaded tensors read by our own loaders as if they were the file (bindweave_core.checkpoints.in_memory)."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from bindweave_core.checkpoints.in_memory import in_memory_checkpoint, is_in_memory
from bindweave_core.encoders.clip_vision import ClipVisionEncoder


def _file_state(enc: ClipVisionEncoder, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {("" if k.startswith("vision_model.") else "vision_model.") + k: v.to(dtype).contiguous()
            for k, v in enc.model.state_dict().items() if not k.endswith("position_ids")}


def test_tensors_in_memory_load_as_the_file_does_and_are_shared(tmp_path):
    tiny = ClipVisionEncoder.tiny(3)
    state = _file_state(tiny, torch.float16)
    path = tmp_path / "clip_vision.safetensors"
    save_file(state, str(path))
    canvases = torch.rand(2, 40, 56, 3, generator=torch.Generator().manual_seed(0))
    with in_memory_checkpoint(state, "host CLIP vision") as pseudo:
        assert is_in_memory(pseudo)
        from_memory = ClipVisionEncoder.load(pseudo, dtype=torch.float32)
        kept = ClipVisionEncoder.load(pseudo, dtype=torch.float16)
    assert not is_in_memory(pseudo)  # registered for the block only
    expected = ClipVisionEncoder.load(path, dtype=torch.float32).encode_canvases(canvases)
    assert torch.equal(from_memory.encode_canvases(canvases), expected)
    # in the stored precision the encoder holds the host's own tensors (no copy); converted ones are new
    stored = state["vision_model.embeddings.patch_embedding.weight"]
    assert kept.model.embeddings.patch_embedding.weight.data_ptr() == stored.data_ptr()
    assert from_memory.model.embeddings.patch_embedding.weight.data_ptr() != stored.data_ptr()


def test_a_missing_tensor_is_named_as_for_a_file():
    import pytest

    from bindweave_core.errors import CheckpointError

    state = _file_state(ClipVisionEncoder.tiny(0), torch.float32)
    del state["vision_model.post_layernorm.weight"]
    with in_memory_checkpoint(state, "host CLIP vision") as pseudo, pytest.raises(CheckpointError) as e:
        ClipVisionEncoder.load(pseudo, dtype=torch.float32)
    assert "post_layernorm.weight" in str(e.value)

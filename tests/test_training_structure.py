"""The trainer's use of the core: encoder identities (they key the feature cache and seed the reference
augmentation, so their format must not drift), the shared encoder loaders, model paths checked up front."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import save_file

from bindweave_core.errors import InputError
from bindweave_core.lazy import Lazy
from bindweave_core.smoke import smoke_dit
from training.config import TrainConfig
from training.model import build_encoders, encoder_identities
from training.preflight import preflight


def _config(tmp_path, **model) -> TrainConfig:
    return TrainConfig.from_dict({"model": {"dit": "d", "vae": "v", "text_encoder": "t", **model},
                                  "data": {"path": "p"}, "train": {"output_dir": str(tmp_path / "out")}})


def test_file_encoder_identity_keeps_its_format(tmp_path):
    """[files of the weights, files of the tokenizer, dtype name] as JSON, sha256 (the format of the caches
    already on disk): written out here by hand, not through the code under test."""
    weights, tokenizer = tmp_path / "umt5.safetensors", tmp_path / "tok"
    weights.write_bytes(b"w" * 7)
    tokenizer.mkdir()
    (tokenizer / "spiece.model").write_bytes(b"s" * 3)
    cfg = _config(tmp_path, text_encoder=str(weights), text_tokenizer=str(tokenizer), dtype="bf16")

    def files(*paths):
        return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in paths]

    expected = hashlib.sha256(json.dumps([files(weights), files(tokenizer / "spiece.model"), "bf16"],
                                         sort_keys=True).encode()).hexdigest()
    ids = encoder_identities(cfg, {"text_encoder": Lazy(lambda: None), "vae": Lazy(lambda: None)})
    assert ids["text_encoder"] == expected
    # a path that is not there yet names no files (its loader reports it); no tokenizer reads as null
    assert ids["vae"] == hashlib.sha256(json.dumps([[], None, "bf16"]).encode()).hexdigest()
    assert ids["planner"] is None and ids["clip_vision"] is None


def test_file_encoders_are_the_pipelines_loaders(tmp_path):
    """build_encoders gives the same lazy loaders (and condition-cache identities) as BindWeavePipeline.from_files."""
    for name in ("vae", "umt5"):
        (tmp_path / name).write_bytes(b"x")
    cfg = _config(tmp_path, vae=str(tmp_path / "vae"), text_encoder=str(tmp_path / "umt5"), dtype="float32")
    encoders = build_encoders(cfg)
    assert encoders["clip_vision"] is None and encoders["planner"] is None
    vae = encoders["vae"]
    assert isinstance(vae, Lazy) and vae.description == str(tmp_path / "vae")
    assert vae.meta["identity"] != encoders["text_encoder"].meta["identity"]
    before = vae.meta["identity"]
    (tmp_path / "vae").write_bytes(b"xy")
    assert build_encoders(cfg)["vae"].meta["identity"] != before


def test_preflight_names_a_missing_encoder_file(tmp_path):
    dit = tmp_path / "dit.safetensors"
    save_file({k: v.contiguous() for k, v in smoke_dit(0).state_dict().items()}, str(dit))
    (tmp_path / "umt5").write_bytes(b"x")
    cfg = _config(tmp_path, dit=str(dit), vae=str(tmp_path / "missing_vae.safetensors"),
                  text_encoder=str(tmp_path / "umt5"))
    with pytest.raises(InputError, match="model.vae .*missing_vae.safetensors not found"):
        preflight(cfg)


def test_torch_dtype_names_of_the_training_config():
    from bindweave_core.dtypes import torch_dtype

    assert [torch_dtype(n) for n in ("bfloat16", "bf16", "float16", "float32")] == [
        torch.bfloat16, torch.bfloat16, torch.float16, torch.float32]
    with pytest.raises(InputError, match="unknown dtype 'float8'"):
        torch_dtype("float8")


@pytest.mark.parametrize("section, key, accepted", [
    ("model", "family", ["bindweave", "wan-i2v", "wan-t2v", "kaleido"]),
    ("objective", "conditioning", ["auto", "slots", "rrope"]),
    ("objective", "sigma_sampling", ["auto", "shifted", "kaleido"]),
])
def test_family_options_of_the_training_config(tmp_path, section, key, accepted):
    """Every family choice is accepted, and a wrong one is refused with a message naming all of them."""
    def config(value):
        base = {"model": {"dit": "d", "vae": "v", "text_encoder": "t"}, "data": {"path": "p"},
                "train": {"output_dir": str(tmp_path / "out")}}
        base.setdefault(section, {})[key] = value
        return TrainConfig.from_dict(base)

    for value in accepted:
        assert getattr(getattr(config(value), section), key) == value
    with pytest.raises(InputError) as err:
        config("phantom")
    assert f"{section}.{key} must be" in str(err.value) and "'phantom'" in str(err.value)
    assert all(value in str(err.value) for value in accepted)

"""Files we write: the same inputs and seed give the same MP4 bytes, and every file gets the user's mode."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from bindweave_core import cli
from bindweave_core.checkpoints.writers import atomic_save_file, save_sharded
from bindweave_core.video_io import write_json, write_mp4
from helpers import SAMPLES, need

# Sidecar fields that describe the run rather than its result: where the files were and how long it took.
RUN_FIELDS = {"output", "timings"}


@contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path) -> int:
    return os.stat(path).st_mode & 0o777


def test_the_same_frames_encode_to_the_same_bytes(tmp_path):
    rng = np.random.default_rng(3)
    frames = rng.integers(0, 256, (17, 96, 128, 3), dtype=np.uint8)  # noise: the hardest case for the encoder
    paths = [write_mp4(frames, tmp_path / f"v{i}.mp4") for i in range(3)]
    blobs = [p.read_bytes() for p in paths]
    assert blobs[0] == blobs[1] == blobs[2]


def _generate(out, seed: int = 5) -> int:
    image = need(SAMPLES / "images" / "human.jpg")
    return cli.main(["generate", "--smoke", "--ref", str(image), "--prompt", "a person walks", "--out", str(out),
                     "--width", "96", "--height", "64", "--frames", "9", "--steps", "2", "--seed", str(seed)])


def _result_fields(sidecar_path) -> dict:
    data = json.loads(sidecar_path.read_text())
    return {k: v for k, v in data.items() if k not in RUN_FIELDS}


def test_two_smoke_runs_with_one_seed_write_identical_files(tmp_path):
    a, b = tmp_path / "a" / "v.mp4", tmp_path / "b" / "v.mp4"
    assert _generate(a) == 0 and _generate(b) == 0
    assert a.read_bytes() == b.read_bytes()
    assert _result_fields(a.with_suffix(".json")) == _result_fields(b.with_suffix(".json"))
    c = tmp_path / "c" / "v.mp4"
    assert _generate(c, seed=6) == 0 and c.read_bytes() != a.read_bytes()  # the check can fail


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_every_file_we_write_follows_the_umask(tmp_path, mask):
    want = 0o666 & ~mask
    with umask(mask):
        paths = [
            atomic_save_file({"w": torch.ones(2)}, tmp_path / "lora.safetensors"),
            write_mp4(np.zeros((1, 16, 16, 3), np.uint8), tmp_path / "v.mp4"),
            write_json({"a": 1}, tmp_path / "v.json"),
        ]
        shards = save_sharded({"a": torch.ones(4), "b": torch.ones(4)}, tmp_path / "dit", max_shard_bytes=16)
    paths += sorted(shards.iterdir())
    assert len(paths) == 6
    assert {p.name: mode(p) for p in paths} == {p.name: want for p in paths}

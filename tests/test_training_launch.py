"""The trainer as a process: Ctrl-C (SIGINT) saves a checkpoint that resumes exactly, two-process
torchrun on CPUs is one data-parallel run, and an accelerate launch that would start one process for
two says how to launch instead. Tiny smoke models; the feature cache is filled in-process first."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training.config import TrainConfig
from training.make_example_dataset import make_example_dataset
from training.train_lora import read_losses, run

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _raw(out: Path, data: Path, cache: Path, **train) -> dict:
    return {"model": {"smoke": True}, "data": {"path": str(data), "num_frames": 5, "buckets": [[32, 32]]},
            "augment": {"variants": 2}, "cache": {"dir": str(cache)}, "lora": {"rank": 4, "alpha": 4},
            "train": {"output_dir": str(out), "mixed_precision": "no", "save_dtype": "float32",
                      "checkpoint_every": 0, "learning_rate": 3e-3, "gradient_checkpointing": False, **train}}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("data")
    path = make_example_dataset(root, samples=4, width=32, height=32, frames=9, layout="jsonl")
    cache = root / "cache"
    run(TrainConfig.from_dict(_raw(root / "fill", path, cache)), cache_only=True)
    return path, cache


def _yaml(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(raw))  # JSON is YAML
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("signum, code, first_word", [(signal.SIGINT, 130, "interrupted"),
                                                     (signal.SIGTERM, 143, r"terminated \(SIGTERM\)")])
def test_ctrl_c_and_sigterm_save_a_checkpoint_that_resumes_exactly(tmp_path, data, signum, code, first_word):
    """Ctrl-C, or SIGTERM (schedulers, docker stop): a checkpoint of the step being trained, one last line,
    exit 130 / 143, no temporary folder; resuming it gives the LoRA of an uninterrupted run, bit for bit."""
    path, cache = data
    out = tmp_path / "run"
    config = _yaml(tmp_path, _raw(out, path, cache, max_steps=1000))
    proc = subprocess.Popen([sys.executable, "-m", "training.train_lora", "--config", str(config)], cwd=ROOT,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            csv = out / "loss.csv"
            if csv.exists() and len(csv.read_text().splitlines()) >= 3:  # two steps done: the loop runs
                break
            time.sleep(0.2)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, err[-2000:]
    last = err.strip().splitlines()[-1]
    found = re.search(first_word + r" at step (\d+): checkpoint (\S+) saved; continue with --resume latest", last)
    assert found, last
    assert "Traceback" not in err and not list((out / "checkpoints").glob(".*tmp*"))
    step = int(found.group(1))
    assert Path(found.group(2)) == out / "checkpoints" / f"step-{step:06d}"
    assert read_losses(out / "loss.csv")[-1][0] == step

    # continuing gives what an uninterrupted run gives
    torch.set_num_threads(1)
    resumed = run(TrainConfig.from_dict(_raw(out, path, cache, max_steps=step + 2)), resume="latest")
    straight = run(TrainConfig.from_dict(_raw(tmp_path / "straight", path, cache, max_steps=step + 2)))
    assert resumed.step == straight.step == step + 2
    assert read_losses(out / "loss.csv") == read_losses(tmp_path / "straight" / "loss.csv")
    name = f"checkpoints/step-{step + 2:06d}/trainable.safetensors"
    a, b = load_file(str(out / name)), load_file(str(tmp_path / "straight" / name))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = load_file(str(resumed.lora_path)), load_file(str(straight.lora_path))  # the exported LoRA files
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_process_torchrun_is_one_data_parallel_run_and_stops_on_ctrl_c(tmp_path, data):
    """torchrun on CPUs: one DDP run over gloo (each process half the batches, one loss log); Ctrl-C, which
    torchrun forwards to its workers as SIGINT, stops both at the same step with one complete checkpoint."""
    from training.checkpointing import check_checkpoint, run_identity

    path, cache = data
    out = tmp_path / "ddp"
    raw = _raw(out, path, cache, max_steps=1000)
    config = _yaml(tmp_path, raw)
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", str(_free_port()), "-m", "training.train_lora", "--config", str(config),
                             "--log-level", "DEBUG"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            csv = out / "loss.csv"
            if csv.exists() and len(csv.read_text().splitlines()) >= 3:
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)  # to torchrun only, as a terminal's Ctrl-C reaches it
        log, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert sorted(re.findall(r"process (\d) of 2: 2 batches of 4 per epoch", log)) == ["0", "1"], log[-3000:]
    shares = {int(r): json.loads(names) for r, names in re.findall(r"process (\d), epoch 0 samples: (\[.*\])", log)}
    assert len(shares[0]) == len(shares[1]) == 2 and not set(shares[0]) & set(shares[1])  # half each, disjoint
    found = re.search(r"interrupted at step (\d+): checkpoint \S+ saved", log)
    assert found, log[-3000:]
    step = int(found.group(1))
    assert [s for s, _ in read_losses(out / "loss.csv")] == list(range(1, step + 1))  # one run's log, not two
    folder = out / "checkpoints" / f"step-{step:06d}"
    check_checkpoint(folder, run_identity(TrainConfig.from_dict(raw), "bindweave"))
    assert (folder / "random_states_0.pkl").exists() and (folder / "random_states_1.pkl").exists()


def test_accelerate_launch_of_two_cpu_processes_says_how_to_launch(tmp_path, data):
    path, cache = data
    config = _yaml(tmp_path, _raw(tmp_path / "acc", path, cache, max_steps=2))
    accelerate = Path(sys.executable).parent / "accelerate"
    if not accelerate.exists():
        pytest.skip("the accelerate command is not installed next to this Python")
    proc = subprocess.run([str(accelerate), "launch", "--num_processes", "2", "--cpu", "-m", "training.train_lora",
                           "--config", str(config)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "accelerate launch asked for 2 processes but started one" in proc.stderr
    assert "torchrun --nproc_per_node 2" in proc.stderr
    assert not (tmp_path / "acc" / "loss.csv").exists()


@pytest.fixture
def small_disk(tmp_path):
    """A 128 KiB tmpfs: room for the dataset report and loss.csv, not for a checkpoint (about 290 KB). Needs
    root (mount); skipped elsewhere."""
    where = tmp_path / "small"
    where.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(where)],
                                           capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)


def test_a_full_disk_is_one_line_and_leaves_no_partial_checkpoint(tmp_path, data, small_disk):
    path, cache = data
    out = small_disk / "run"
    config = _yaml(tmp_path, _raw(out, path, cache, max_steps=2, checkpoint_every=1))
    proc = subprocess.run([sys.executable, "-m", "training.train_lora", "--config", str(config)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert re.search(r"ERROR cannot write the checkpoint \S+step-000001: torch.save failed \(.*\) with \d+ KiB free "
                     r"on that disk. Free some space or choose another train.output_dir", last), last
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == []  # no partial step folder, no .tmp
    assert not (out / "bindweave_lora.safetensors").exists()

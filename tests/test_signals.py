"""SIGTERM like Ctrl-C (bindweave_core.signals), disk errors in one line, inspect of what is not a model file,
and command-line errors in one line."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from bindweave_core import cli
from bindweave_core.signals import EXIT_TERMINATED, Terminated, describe_os_error, exit_code, terminate_as_interrupt
from helpers import REPO


def test_sigterm_raises_terminated_inside_and_the_old_handler_comes_back():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt) as caught, terminate_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        signal.sigtimedwait([], 0.5) if hasattr(signal, "sigtimedwait") else None
    assert isinstance(caught.value, Terminated) and exit_code(caught.value) == EXIT_TERMINATED == 143
    assert exit_code(KeyboardInterrupt()) == 130
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_full_disk_is_one_line_with_the_fix():
    e = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/out/x.safetensors")
    assert describe_os_error(e, "the LoRA") == ("cannot write the LoRA (/data/out/x.safetensors): No space left on "
                                                "device. Free some space or choose another folder, then run again.")


def test_sigterm_while_writing_leaves_no_file_and_exits_143(tmp_path, monkeypatch, capsys):
    """SIGTERM arrives while the video is being written (a partial temporary file exists): one line, exit 143, and
    neither the video, its sidecar nor a temporary file is left."""
    from bindweave_core import video_io

    Image.new("RGB", (64, 48), (200, 120, 40)).save(tmp_path / "ref.png")
    out = tmp_path / "out"

    def terminated_while_writing(writer, frames):  # the decoded frames stream into the MP4 being written
        Path(writer.container.name).write_bytes(b"half a video")  # a partial temporary MP4 exists
        assert any(p.name.startswith(".video.tmp-") for p in out.iterdir())
        os.kill(os.getpid(), signal.SIGTERM)
        signal.sigtimedwait([], 0.5) if hasattr(signal, "sigtimedwait") else None
        raise AssertionError("SIGTERM was not raised")

    monkeypatch.setattr(video_io.Mp4Writer, "write", terminated_while_writing)
    before = signal.getsignal(signal.SIGTERM)
    code = cli.main(["generate", "--smoke", "--ref", str(tmp_path / "ref.png"), "--prompt", "a cat walks",
                     "--out", str(out / "video.mp4"), "--steps", "1", "--width", "32", "--height", "32", "--frames", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 143 and err[-1] == "terminated (SIGTERM) while decoding the video (VAE); no file was written"
    assert sorted(p.name for p in out.iterdir()) == []  # no .tmp video, no .tmp sidecar
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize("make, word", [(os.mkfifo, "a named pipe (FIFO)"), (None, "a character device")])
def test_inspect_refuses_what_is_not_a_model_file_at_once(tmp_path, make, word):
    """A FIFO used to block inspect forever (run in a process with a timeout, so a regression fails, not hangs)."""
    path = tmp_path / "model.safetensors"
    if make is not None:
        make(path)
    else:
        path = "/dev/null"
    proc = subprocess.run([sys.executable, "-m", "bindweave_core", "inspect", str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"error: {path} is {word}, not a model file: inspect reads a .safetensors/.gguf/.pt file or a model folder.")


def test_inspect_still_reads_model_folders(tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    folder = tmp_path / "transformer"
    folder.mkdir()
    save_file({"foo.weight": np.zeros((2, 2), np.float32)}, str(folder / "diffusion_pytorch_model.safetensors"))
    assert cli.main(["inspect", str(folder)]) == 1  # read (an unknown model), not refused as "not a file"


@pytest.mark.parametrize("argv, first", [
    (["generate", "--ref", "a.png", "--prompt", "x", "--out", "v.mp4", "--steps", "1.5"],
     "error: argument --steps: invalid int value: '1.5'"),
    (["generate", "--ref", "a.png", "--prompt", "x", "--batch"], "error: argument --batch: expected one argument"),
    (["generat"], "error: argument command: invalid choice: 'generat' (choose from "),
])
def test_command_line_errors_are_one_line_and_a_hint(argv, first, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err.splitlines()
    assert e.value.code == 2 and err[0].startswith(first), err
    assert len(err) == 2 and err[1].endswith("--help lists the options)")  # no usage block


def test_the_trainers_command_line_errors_are_one_line_too(capsys):
    from training.train_lora import build_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([])
    assert e.value.code == 2 and capsys.readouterr().err.splitlines() == [
        "error: the following arguments are required: --config",
        "(python -m training.train_lora --help lists the options)"]

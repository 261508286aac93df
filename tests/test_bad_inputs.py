"""Bad inputs through the CLI (tools/bad_inputs.py), --help without torch, and docs/bad-inputs.md."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from helpers import REPO

sys.path.insert(0, str(REPO / "tools"))
import bad_inputs  # noqa: E402


def test_every_bad_input_gets_its_message_and_changes_nothing(tmp_path):
    """Each case: exit 2 (130 for Ctrl-C, 143 for SIGTERM), no traceback, the message, inputs unchanged (sha256), no output
    left, no model built before the failure; then docs/bad-inputs.md must be what the cases print."""
    d = tmp_path / "in"
    results = bad_inputs.run_cases(d)
    assert [r.case.id for r in results] == [c.id for c in bad_inputs.CASES]
    failures = {r.case.id: bad_inputs.problems(r) for r in results if bad_inputs.problems(r)}
    assert not failures, failures
    assert sum(r.ran for r in results) >= len(results) - 1  # only the CPU-only-torch case may be skipped
    ctrl_c = next(r for r in results if r.case.id == "ctrl-c")
    assert ctrl_c.code == 130 and bad_inputs.message(ctrl_c).count("\n") == 0  # one line
    sigterm = next(r for r in results if r.case.id == "sigterm")  # SIGTERM: as Ctrl-C, exit 128 + 15
    assert sigterm.code == 143 and bad_inputs.message(sigterm).count("\n") == 0 and not sigterm.left
    stages = [ln for ln in ctrl_c.stderr.splitlines() if ln.startswith("INFO ") and "estimated" not in ln]
    assert stages[:3] == ["INFO loading models", "INFO conditioning (planner, text encoder, references)",
                          "INFO sampling (1000 steps)"], stages  # the display names each stage
    existing = bad_inputs.DOC.read_text()
    assert bad_inputs.render(results, d, existing) == existing, \
        "docs/bad-inputs.md is stale: regenerate it with python tools/bad_inputs.py"


@pytest.mark.parametrize("command", [["generate", "--help"], ["inspect", "--help"], ["--help"]])
def test_help_does_not_import_torch(command):
    code = ("import sys\nfrom bindweave_core.cli import main\n"
            f"try:\n    main({command!r})\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.stderr.strip().splitlines()[-1] == "NO-TORCH", out.stderr
    assert "usage:" in out.stdout


def test_generate_help_states_every_default():
    """Every option with a default shows it; size/frames/steps show the smoke model's own too."""
    from bindweave_core import constants as C
    from bindweave_core.cli import build_parser
    from bindweave_core.smoke import SMOKE_DEFAULTS

    parser = build_parser()
    generate = parser._subparsers._group_actions[0].choices["generate"]
    text = generate.format_help()
    inputs = {"--ref", "--mask", "--prompt", "--prompt-file", "--out", "--dit", "--vae", "--text-encoder",
              "--clip-vision", "--planner", "--planner-tokenizer", "--text-tokenizer", "--kaleido-dir"}
    for action in generate._actions:
        if not action.option_strings or action.nargs == 0 or inputs & set(action.option_strings):
            continue  # flags (store_true) and the user's own files have no default to show
        help_text = generate.formatter_class("x")._get_help_string(action)
        assert "default" in help_text, f"{action.option_strings[0]} does not say its default"
    for flag, official, smoke in (("--width", C.DEFAULT_WIDTH, SMOKE_DEFAULTS["width"]),
                                  ("--height", C.DEFAULT_HEIGHT, SMOKE_DEFAULTS["height"]),
                                  ("--frames", C.DEFAULT_FRAMES, SMOKE_DEFAULTS["num_frames"]),
                                  ("--steps", C.DEFAULT_STEPS, SMOKE_DEFAULTS["steps"])):
        action = next(a for a in generate._actions if flag in a.option_strings)
        assert f"default {official} " in action.help and f"smoke model {smoke}" in action.help, action.help
    assert f"default {C.DEFAULT_SEED}, the official one" in " ".join(text.split())  # --seed


def test_python_api_and_nodes_get_the_same_value_checks():
    """GenerationSettings (the API's generate, the nodes and the trainer's preview make one) refuses what the CLI
    refuses, when it is made."""
    from bindweave_core.errors import InputError
    from bindweave_core.pipeline import GenerationSettings

    for change, message in (({"seed": 2 ** 64}, "seed must be"), ({"seed": -1}, "seed must be"),
                            ({"fps": 0}, "fps must be a whole number from 1 to 120"),
                            ({"guidance": -0.5}, "guidance must be a number from 0 to 100"),
                            ({"shift": 0.0}, "shift must be a number from 0.1 to 100"), ({"shift": float("inf")}, "finite"),
                            ({"width": 100000}, "from 16 to 16384"), ({"refine_seed": -2}, "refine seed"),
                            ({"steps": 5000}, "from 1 to 1000")):
        with pytest.raises(InputError, match=message):
            GenerationSettings(prompt="a cat", **change)
    GenerationSettings(prompt="a cat", seed=2 ** 64 - 1, guidance=0.0).validate(1)  # the edges are accepted


def test_generate_to_file_checks_the_paths_before_generating(tmp_path):
    from bindweave_core.errors import InputError
    from bindweave_core.generate_cli import generate_to_file

    class NoRun:
        def generate(self, *a, **k):
            raise AssertionError("generate must not run")

    ref = tmp_path / "ref.mp4"
    ref.write_bytes(b"an input")
    with pytest.raises(InputError, match="would overwrite an input file"):
        generate_to_file(NoRun(), [str(ref)], None, ref)
    (tmp_path / "out.mp4").mkdir()
    with pytest.raises(InputError, match="is a folder"):
        generate_to_file(NoRun(), [str(ref)], None, tmp_path / "out.mp4")
    assert ref.read_bytes() == b"an input"


def test_cpu_memory_check_names_settings_that_fit():
    from bindweave_core.config import PRESETS
    from bindweave_core.errors import OutOfMemoryError
    from bindweave_core.memory import GiB, RunShape, estimate_vram
    from bindweave_core.preflight import check_cpu_memory

    cfg = PRESETS["bindweave-14b"]
    shape = RunShape(1280, 720, 81, batch=2)
    free = int(estimate_vram(cfg, shape).total * 0.8)
    with pytest.raises(OutOfMemoryError) as e:
        check_cpu_memory(cfg, shape, free)
    text = str(e.value)
    assert "will not fit in this machine's memory (cpu)" in text and f"{free / GiB:.1f} GiB available" in text
    suggested = re.findall(r"^  (--[^:]+): ([\d.]+) GiB$", text, re.M)
    assert {label.split()[0] for label, _ in suggested} == {"--width", "--frames"}, text  # batch 1 does not fit
    for label, gib in suggested:  # each suggestion's own estimate fits (5% margin)
        args = label.split()
        changes = {"width": int(args[1]), "height": int(args[3])} if args[0] == "--width" else {"num_frames": int(args[1])}
        assert estimate_vram(cfg, shape.replace(**changes)).fits(free) and float(gib) * GiB * 1.05 <= free + 0.1 * GiB
        assert (changes.get("width", 1280) % 16, changes.get("num_frames", 81) % 4) == (0, 1)
    assert check_cpu_memory(cfg, shape, free, memory_check=False).total > free
    assert check_cpu_memory(cfg, shape, None) is not None  # unknown free memory: no check


def test_inspect_of_an_unknown_file_does_not_exit_0(tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    from bindweave_core.cli import main

    path = tmp_path / "unknown.safetensors"
    save_file({"foo.weight": np.zeros((2, 2), np.float32)}, str(path))
    assert main(["inspect", str(path)]) == 1

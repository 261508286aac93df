"""Bad inputs through the CLI (tools/bad_inputs.py), --help without torch, and docs/bad-inputs.md."""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import REPO

sys.path.insert(0, str(REPO / "tools"))
import bad_inputs  # noqa: E402


def test_every_bad_input_gets_its_message_and_changes_nothing(tmp_path):
    """Each case: exit 2 (130 for Ctrl-C), no traceback, the message, inputs unchanged (sha256), no output
    left, no model built before the failure; then docs/bad-inputs.md must be what the cases print."""
    d = tmp_path / "in"
    results = bad_inputs.run_cases(d)
    assert [r.case.id for r in results] == [c.id for c in bad_inputs.CASES]
    failures = {r.case.id: bad_inputs.problems(r) for r in results if bad_inputs.problems(r)}
    assert not failures, failures
    assert sum(r.ran for r in results) >= len(results) - 1  # only the CPU-only-torch case may be skipped
    ctrl_c = next(r for r in results if r.case.id == "ctrl-c")
    assert ctrl_c.code == 130 and bad_inputs.message(ctrl_c).count("\n") == 0  # one line
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
    assert "(default: 0)" in " ".join(text.split())  # --seed

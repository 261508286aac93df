"""Every bad input of ``python -m bindweave_core generate``, run through the CLI, and the message it gets.

    python tools/bad_inputs.py           # run every case, rewrite docs/bad-inputs.md
    python tools/bad_inputs.py --check   # exit 1 if docs/bad-inputs.md is stale

``tests/test_bad_inputs.py`` runs the same cases and asserts, for each: exit code 2 (130 for Ctrl-C,
143 for SIGTERM), no traceback, the message, every input file unchanged (sha256 before and after), no
output file (nor temporary file) left, and for all but the memory and signal cases that no model was
built. The cases run in this process through ``bindweave_core.cli.main`` (the function
``python -m bindweave_core`` calls), except three that need a real process: an unwritable output
(checked end to end, without torch being imported), Ctrl-C and SIGTERM (sent while the smoke model
samples). Those start first and run alongside. A few cases run ``inspect`` instead of ``generate``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "bad-inputs.md"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MAX_SEED = 2 ** 64 - 1
SIGNAL_PROCESSES = {"sigint": signal.SIGINT, "sigterm": signal.SIGTERM}  # Case.process -> the signal it sends


@dataclass
class Case:
    id: str
    what: str  # the bad input, in words
    args: list[str]  # after "generate"; "{d}" is the folder with the input files
    message: str  # a regex the error must match
    code: int = 2
    before_models: bool = True  # fails before any model is built
    process: str = ""  # "" in this process; "subprocess", "sigint" or "sigterm" in a real one
    needs: str = ""  # "cpu-only-torch": only runs where torch has no CUDA; "tmpfs": root with mount rights
    command: str = "generate"  # the sub-command the args follow (inspect: what a model file is)
    stage: str = ""  # where it stops, when the default wording (from before_models and process) is not exact


@dataclass
class Result:
    case: Case
    code: int
    stderr: str
    models_built: bool = False
    changed: list[str] = field(default_factory=list)  # input files whose bytes changed
    left: list[str] = field(default_factory=list)  # output files left behind
    ran: bool = True


def base(*extra: str, ref: str = "{d}/ref.png", prompt: tuple[str, ...] = ("--prompt", "a cat walks"),
         out: str = "{d}/out/video.mp4") -> list[str]:
    args = ["--smoke"]
    if ref:
        args += ["--ref", ref]
    args += list(prompt)
    if out:
        args += ["--out", out]
    return args + list(extra)


CASES: list[Case] = [
    # ---- output paths: all fail before any model is built
    Case("out-proc", "--out under /proc (cannot be written)", base(out="/proc/bindweave/video.mp4"),
         r"cannot write in /proc", process="subprocess"),
    Case("out-file-as-folder", "--out inside a path whose folder is a file", base(out="{d}/ref.png/video.mp4"),
         r"is a file, so no folder can be made there"),
    Case("out-folder", "--out names an existing folder", base(out="{d}/folder.mp4"), r"is a folder"),
    Case("out-not-mp4", "--out without .mp4", base(out="{d}/out/video.avi"), r"must end in \.mp4"),
    Case("out-is-ref", "--out is the reference image", base(ref="{d}/ref.mp4", out="{d}/ref.mp4"),
         r"would overwrite an input file"),
    Case("out-hardlink-ref", "--out is a hard link to the reference image", base(out="{d}/link.mp4"),
         r"would overwrite an input file"),
    Case("sidecar-is-prompt-file", "the .json sidecar would replace --prompt-file",
         base(prompt=("--prompt-file", "{d}/clip.json"), out="{d}/clip.mp4"), r"sidecar .* would overwrite an input"),
    # ---- prompt
    Case("prompt-file-missing", "--prompt-file does not exist", base(prompt=("--prompt-file", "{d}/nope.txt")),
         r"--prompt-file .* not found"),
    Case("prompt-file-folder", "--prompt-file is a folder", base(prompt=("--prompt-file", "{d}/folder.mp4")),
         r"is a folder"),
    Case("prompt-file-not-utf8", "--prompt-file is not UTF-8 (Latin-1 text)",
         base(prompt=("--prompt-file", "{d}/latin1.txt")), r"is not UTF-8 text"),
    Case("prompt-file-empty", "--prompt-file is empty", base(prompt=("--prompt-file", "{d}/empty.txt")),
         r"is empty"),
    Case("prompt-empty", "--prompt is blank", base(prompt=("--prompt", "  ")), r"the prompt is empty"),
    # ---- images and model files
    Case("ref-missing", "--ref does not exist", base(ref="{d}/nope.png"), r"reference image 1 not found"),
    Case("ref-folder", "--ref is a folder", base(ref="{d}/folder.mp4"), r"is a directory"),
    Case("ref-not-image", "--ref is a text file named .png", base(ref="{d}/text.png"), r"not an image file"),
    Case("ref-truncated", "--ref is a truncated PNG", base(ref="{d}/truncated.png"), r"cannot be decoded"),
    Case("refs-too-many", "five --ref images for BindWeave", base(*["--ref", "{d}/ref.png"] * 4),
         r"5 reference images given"),
    Case("mask-count", "two --mask for one --ref", base("--mask", "{d}/ref.png", "--mask", "{d}/ref.png"),
         r"2 masks for 1 references"),
    Case("mask-not-image", "--mask is not an image", base("--mask", "{d}/text.png"), r"mask 1 .*not an image"),
    Case("model-missing", "--dit does not exist", ["--ref", "{d}/ref.png", "--prompt", "x", "--out",
                                                    "{d}/out/video.mp4", "--dit", "{d}/nope.safetensors"],
         r"--dit .* not found"),
    # ---- device
    Case("device-name", "--device is not a device name", base("--device", "gpu0"), r"is not a device name"),
    Case("device-cuda-cpu-torch", "--device cuda with a CPU-only torch", base("--device", "cuda"),
         r"CPU-only build", needs="cpu-only-torch"),
    # ---- settings
    Case("seed-64-bit", "--seed past 64 bits", base("--seed", str(MAX_SEED + 1)), r"seed must be a whole number"),
    Case("seed-negative", "--seed below 0", base("--seed", "-1"), r"seed must be a whole number"),
    Case("fps-zero", "--fps 0", base("--fps", "0"), r"fps must be a whole number from 1 to 120"),
    Case("fps-negative", "--fps -1", base("--fps", "-1"), r"fps must be a whole number from 1 to 120"),
    Case("guidance-negative", "--guidance -1", base("--guidance", "-1"), r"guidance must be a number from 0 to 100"),
    Case("guidance-nan", "--guidance nan", base("--guidance", "nan"), r"guidance must be finite, a number from 0 to 100"),
    Case("shift-zero", "--shift 0", base("--shift", "0"), r"shift must be a number from 0\.1 to 100"),
    Case("shift-negative", "--shift -3", base("--shift", "-3"), r"shift must be a number from 0\.1 to 100"),
    Case("steps-zero", "--steps 0", base("--steps", "0"), r"steps must be a whole number from 1 to 1000, got 0"),
    Case("steps-huge", "--steps 100000", base("--steps", "100000"), r"steps must be a whole number from 1 to 1000, got 100000"),
    Case("frames-not-4k1", "--frames 80", base("--frames", "80"), r"frames must be 4k\+1"),
    Case("size-not-16", "--width 1000", base("--width", "1000"), r"width must be a multiple of 16"),
    Case("size-huge", "--width 100000 --height 100000", base("--width", "100000", "--height", "100000"),
         r"width must be a multiple of 16 from 16 to 16384, got 100000"),
    Case("memory", "a size that needs more memory than the machine has (CPU)",
         base("--width", "16384", "--height", "16384", "--frames", "4077", "--device", "cpu"),
         r"will not fit in this machine's memory", before_models=False),
    # ---- data read back, pre-planner checks, output faults (issue 24 items 2, 3, 5)
    Case("lora-nan", "--lora file holding an inf (a diverged training run)", base("--lora", "{d}/lora_inf.safetensors"),
         r"lora_inf\.safetensors: tensor .*lora_B\.weight holds non-finite values \(0 NaN, 1 inf of \d+\)"),
    Case("lora-shape", "--lora made for a bigger DiT (the smoke DiT is 64 wide)",
         base("--lora", "{d}/lora_14b.safetensors"), r"this LoRA does not fit the model: .*wrong shape",
         before_models=False, stage="after building the pipeline (a real DiT: from its header, no weights), "
                                    "before the planner"),
    Case("ref-1x1", "a 1x1 --ref image", base(ref="{d}/tiny.png"),
         r"reference image 1 is 1x1 pixels; references must be at least 16x16"),
    Case("mask-size", "--mask of another size than its --ref", base("--mask", "{d}/mask_32.png"),
         r"mask 1 is 32x32 but its reference image is 64x48"),
    Case("prompt-1mib", "a 1 MiB --prompt-file", base(prompt=("--prompt-file", "{d}/huge.txt")),
         r"is 1,048,\d+ characters long; the limit is 8,192 characters"),
    Case("smoke-with-files", "--smoke together with --dit", base("--dit", "{d}/ref.png"),
         r"--smoke runs the built-in tiny random model and would ignore --dit"),
    Case("cache-aliases", "--condition-cache A --planner-cache B", base("--condition-cache", "{d}/cache_a",
                                                                        "--planner-cache", "{d}/cache_b"),
         r"two names of the same option"),
    Case("out-empty-stem", "--out DIR/.mp4 (no name before .mp4)", base(out="{d}/out/.mp4"),
         r"has no file name before \.mp4; give one, e\.g\. .*/out/video\.mp4"),
    Case("disk-full", "the output folder is on a full disk (a 16 KiB tmpfs)", base("--steps", "1"),
         r"^could not write .*/out/video\.mp4: No space left on device; free some space there",
         before_models=False, needs="tmpfs", stage="while writing the video (after sampling and decoding)"),
    # ---- cancel
    Case("ctrl-c", "Ctrl-C (SIGINT) while sampling", base("--steps", "1000"), r"^cancelled at step \d+ of 1000",
         code=130, before_models=False, process="sigint"),
    # ---- settings typed by the one validator (bindweave_core.setting_bounds), SIGTERM, inspect, command line
    Case("steps-not-whole", "--steps 1.5", base("--steps", "1.5"), r"^argument --steps: invalid int value: '1\.5'\n"
         r"\(python -m bindweave_core generate --help lists the options\)$"),
    Case("frames-text", "--frames eighty", base("--frames", "eighty"), r"^argument --frames: invalid int value"),
    Case("sampler-unknown", "--sampler dpm (not one of ours)", base("--sampler", "dpm"),
         r"^argument --sampler: invalid choice: 'dpm'"),
    Case("out-missing", "no --out (the usage block is not printed)", base(out=""),
         r"^generate needs --out \(or --batch CASES --out-dir DIR for a case file\)\.$"),
    Case("shift-tiny", "--shift 0.05 (below the validator's 0.1)", base("--shift", "0.05"),
         r"shift must be a number from 0\.1 to 100, got 0\.05"),
    Case("guidance-huge", "--guidance 1000", base("--guidance", "1000"), r"guidance must be a number from 0 to 100"),
    Case("fps-huge", "--fps 1000", base("--fps", "1000"), r"fps must be a whole number from 1 to 120, got 1000"),
    Case("step-cache-huge", "--step-cache 5", base("--step-cache", "5"),
         r"step_cache must be a number from 0 to 1, got 5\.0"),
    Case("prompt-invisible", "--prompt of zero-width spaces only", base(prompt=("--prompt", "\u200b\u200b \u2060")),
         r"the prompt is empty \(or only invisible characters\)"),
    Case("sigterm", "SIGTERM (docker stop, schedulers) while sampling", base("--steps", "1000"),
         r"^terminated \(SIGTERM\) at step \d+ of 1000; no file was written$", code=143, before_models=False,
         process="sigterm"),
    Case("inspect-fifo", "inspect on a named pipe (used to hang)", ["{d}/pipe.safetensors"],
         r"pipe\.safetensors is a named pipe \(FIFO\), not a model file", command="inspect"),
    Case("inspect-device", "inspect on /dev/null", ["/dev/null"], r"/dev/null is a character device, not a model file",
         command="inspect"),
    Case("inspect-missing", "inspect on a file that does not exist", ["{d}/nope.safetensors"],
         r"nope\.safetensors not found", command="inspect"),
]


# ---------------------------------------------------------------------------------- inputs
def make_inputs(d: Path) -> None:
    """The input files the cases read (a valid reference, broken files, a prompt file, ...)."""
    from PIL import Image

    d.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 48), (200, 120, 40)).save(d / "ref.png")
    Image.new("RGB", (64, 48), (40, 120, 200)).save(d / "ref.mp4", format="PNG")  # an image named .mp4
    os.link(d / "ref.png", d / "link.mp4")
    (d / "folder.mp4").mkdir()
    (d / "clip.json").write_text('{"prompt": "a cat walks"}\n')
    (d / "latin1.txt").write_bytes("un caf\u00e9 cr\u00e8me".encode("latin-1"))
    (d / "empty.txt").write_text("\n")
    (d / "text.png").write_text("not an image\n")
    png = (d / "ref.png").read_bytes()
    (d / "truncated.png").write_bytes(png[: len(png) // 2])
    os.mkfifo(d / "pipe.safetensors")  # inspect must refuse it, not block reading it
    _make_issue24_inputs(d)


def _make_issue24_inputs(d: Path) -> None:
    """Inputs of the issue-24 block: LoRAs (one holding an inf, one for a 5120-wide DiT), a 1x1 reference, a
    mask of the wrong size, a 1 MiB prompt file."""
    import numpy as np
    from PIL import Image
    from safetensors.numpy import save_file

    up = np.zeros((64, 4), np.float32)
    up[3, 1] = np.inf
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": np.zeros((4, 64), np.float32),
               "diffusion_model.blocks.0.self_attn.q.lora_B.weight": up}, str(d / "lora_inf.safetensors"))
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": np.zeros((4, 5120), np.float32),
               "diffusion_model.blocks.0.self_attn.q.lora_B.weight": np.zeros((5120, 4), np.float32)},
              str(d / "lora_14b.safetensors"))
    Image.new("RGB", (1, 1), (9, 9, 9)).save(d / "tiny.png")
    Image.new("L", (32, 32), 255).save(d / "mask_32.png")
    (d / "huge.txt").write_text("a cat walks " * ((1 << 20) // 12 + 1))


def _hashes(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file() and "out" not in p.relative_to(d).parts}


def _outputs(d: Path) -> list[str]:
    out = d / "out"
    return sorted(str(p.relative_to(d)) for p in out.rglob("*")) if out.exists() else []


def _argv(case: Case, d: Path) -> list[str]:
    return [case.command, *[a.replace("{d}", str(d)) for a in case.args]]


def _runnable(case: Case) -> bool:
    if case.needs == "cpu-only-torch":
        import torch

        return torch.version.cuda is None and torch.version.hip is None
    if case.needs == "tmpfs":
        return os.geteuid() == 0 and shutil.which("mount") is not None
    return True


@contextlib.contextmanager
def _full_disk(case: Case, d: Path):
    """For a "tmpfs" case, ``d/out`` is a 16 KiB tmpfs while it runs (its files are listed before unmounting)."""
    if case.needs != "tmpfs":
        yield
        return
    out = d / "out"
    out.mkdir(exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(out)],
                             capture_output=True).returncode == 0
    try:
        yield
    finally:
        if mounted:
            left = _outputs(d)
            subprocess.run(["umount", str(out)], check=False)
            for name in left:  # show them on the disk below, so the case reports them
                (d / name).parent.mkdir(parents=True, exist_ok=True)
                (d / name).touch()
        if not any(out.iterdir()):
            out.rmdir()


# ---------------------------------------------------------------------------------- running
def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def _start(case: Case, d: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bindweave_core", *_argv(case, d)], cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish_signal(proc: subprocess.Popen, signum: int) -> tuple[int, str]:
    """Wait for the sampling stage, send ``signum`` (SIGINT or SIGTERM), collect what the process says."""
    seen = []
    for line in proc.stderr:  # log lines end in newlines; the tqdm bar starts after this one
        seen.append(line)
        if line.startswith("INFO sampling ("):
            proc.send_signal(signum)
            break
    rest, err = proc.communicate(timeout=120)
    return proc.returncode, "".join(seen) + err


def _run_in_process(case: Case, d: Path) -> tuple[int, str, bool]:
    """``bindweave_core.cli.main`` on the case's arguments: (exit code, stderr, whether models were built)."""
    from bindweave_core import cli, generate_cli

    built = []
    real_build = generate_cli.build_pipeline

    def recording_build(args):
        built.append(True)
        return real_build(args)

    stderr = io.StringIO()
    root = logging.getLogger()
    handlers = root.handlers[:]
    for h in handlers:
        root.removeHandler(h)
    generate_cli.build_pipeline = recording_build
    try:
        with contextlib.redirect_stderr(stderr):
            try:
                code = cli.main(_argv(case, d))
            except SystemExit as e:  # argparse
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:  # what Python would print for an uncaught exception
                stderr.write(traceback.format_exc())
                code = 1
    finally:
        generate_cli.build_pipeline = real_build
        for h in root.handlers[:]:
            root.removeHandler(h)
        for h in handlers:
            root.addHandler(h)
    return code, stderr.getvalue(), bool(built)


def run_cases(d: Path, cases: list[Case] | None = None) -> list[Result]:
    """Run every case against fresh inputs in ``d`` (which must not exist yet or be empty)."""
    cases = CASES if cases is None else cases
    make_inputs(d)
    hashes = _hashes(d)
    signal_dirs = {name: d / name for name in SIGNAL_PROCESSES}  # their own inputs: outputs must not mix
    signal_hashes = {}
    for name, where in signal_dirs.items():
        make_inputs(where)
        signal_hashes[name] = _hashes(where)
    hashes = {k: v for k, v in hashes.items() if not k.startswith(tuple(SIGNAL_PROCESSES))}
    procs = {c.id: _start(c, signal_dirs.get(c.process, d))
             for c in cases if c.process}  # started first: they run while the in-process cases do
    results = []
    for case in cases:
        if case.process:
            continue
        if not _runnable(case):
            results.append(Result(case, 0, "", ran=False))
            continue
        with _full_disk(case, d):
            code, err, built = _run_in_process(case, d)
        now = _hashes(d)  # (the signal folders' files are compared once their processes are done)
        results.append(Result(case, code, err, built, [k for k in hashes if now.get(k) != hashes[k]], _outputs(d)))
    for case in cases:
        if not case.process:
            continue
        proc = procs[case.id]
        where, before = (signal_dirs[case.process], signal_hashes[case.process]) if case.process in signal_dirs \
            else (d, hashes)
        if case.process in SIGNAL_PROCESSES:
            code, err = _finish_signal(proc, SIGNAL_PROCESSES[case.process])
        else:
            _, err = proc.communicate(timeout=300)
            code = proc.returncode
        now = _hashes(where)
        results.append(Result(case, code, err, False, [k for k in before if now.get(k) != before[k]],
                              _outputs(where)))
    order = {c.id: i for i, c in enumerate(cases)}
    return sorted(results, key=lambda r: order[r.case.id])


def problems(result: Result) -> list[str]:
    """What is wrong with a case's outcome (empty: as required)."""
    if not result.ran:
        return []
    case, out = result.case, []
    if result.code != case.code:
        out.append(f"exit code {result.code}, expected {case.code}")
    if "Traceback" in result.stderr:
        out.append("a traceback was printed")
    if not re.search(case.message, message(result), re.M):
        out.append(f"message does not match {case.message!r}")
    if result.changed:
        out.append(f"input files changed: {result.changed}")
    if result.left:
        out.append(f"output files left: {result.left}")
    if case.before_models and result.models_built:
        out.append("a model was built before the failure")
    return out


def message(result: Result) -> str:
    """The error the user reads: the lines from 'error:' (or the cancel line) on, without log lines."""
    lines = [ln.split("\r")[-1] for ln in result.stderr.splitlines()]
    for i, ln in enumerate(lines):
        if ln.startswith(("error: ", "cancelled", "terminated")):
            return "\n".join(lines[i:]).removeprefix("error: ").strip()
    return result.stderr.strip()


# ---------------------------------------------------------------------------------- the doc
def _doc_text(result: Result, d: Path) -> str:
    text = message(result)
    for name in SIGNAL_PROCESSES:
        text = text.replace(str(d / name), "<dir>")
    text = text.replace(str(d), "<dir>")
    if result.case.id == "memory":  # figures depend on the machine and the estimate's calibration
        text = text.splitlines()[0] + " Then: settings that would fit (estimated), or none, and what else to try."
        text = re.sub(r"\d+\.\d+", "N", text)
    text = re.sub(r"step \d+ of", "step k of", text)
    return text


def _existing_rows(doc: str) -> dict[str, str]:
    return {m.group(1): m.group(0) for m in re.finditer(r"^\| `([\w-]+)` \|.*$", doc, re.M)}


def render(results: list[Result], d: Path, existing: str = "") -> str:
    """docs/bad-inputs.md; rows of cases this machine cannot run are kept from ``existing``."""
    kept = _existing_rows(existing)
    rows = []
    for r in results:
        if not r.ran:
            rows.append(kept.get(r.case.id, f"| `{r.case.id}` | {r.case.what} | (not run on this machine) | | |"))
            continue
        text = _doc_text(r, d).replace("|", "\\|").replace("\n", "<br>")
        when = r.case.stage or (
            "before reading the file" if r.case.command == "inspect" else "before any model"
            if r.case.before_models else "during sampling" if r.case.process in SIGNAL_PROCESSES
            else "after building the smoke model, before sampling")
        rows.append(f"| `{r.case.id}` | {r.case.what} | {r.case.code} | {when} | {text} |")
    return "\n".join([
        "# Bad inputs and what they get",
        "",
        "Generated by `python tools/bad_inputs.py`, which runs each case through "
        "`python -m bindweave_core generate` (the smoke model); `tests/test_bad_inputs.py` runs them again and "
        "fails when this page is stale (the `inspect` cases run `python -m bindweave_core inspect`). Every case "
        "exits with the code shown and one message (a bad command line: the message and where to find the "
        "options, without the usage block), prints no traceback, leaves every input file byte for byte as it "
        "was and writes no output file, not even a temporary one. Checks run in "
        "this order, before any model is loaded: output and sidecar paths, prompt file, reference and mask "
        "images (reference sizes, each mask against its reference), model paths, device, settings (the prompt's "
        "length and content too), LoRA files (read whole: NaN/inf refused); LoRA shapes against the DiT are "
        "checked once the pipeline is built (for a real DiT from its file header, no weights loaded); the memory "
        "estimate runs once the pipeline is built and before any weights of a real model load. Paths are shown "
        "as `<dir>`; the memory figures depend on the machine.",
        "",
        "Inputs that are not errors: 16-bit, float, CMYK, LA and palette images are converted to 8-bit RGB "
        "(`bindweave_core/images.py`); an animated image gives its first frame with a logged note; a prompt "
        "longer than UMT5's 512 tokens is used in full by the planner and cut by UMT5, with a warning naming "
        "both counts. A reference or mask carrying an EXIF orientation tag is turned upright first, as ComfyUI's "
        "LoadImage does (docs/fidelity.md). A damaged `--condition-cache` entry (bytes changed, same size) fails its "
        "sha256 and is recomputed and rewritten, with one warning. A NaN/inf in the planner, UMT5 or CLIP output, "
        "the first step's velocity or the final latents stops the run naming the stage, the model and its "
        "precision (`bindweave_core/finite.py`; tests/test_finite_checks.py injects them).",
        "",
        "| case | bad input | exit | fails | message |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    import tempfile

    argv = sys.argv[1:] if argv is None else argv
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "in"
        results = run_cases(d)
        bad = {r.case.id: problems(r) for r in results if problems(r)}
        existing = DOC.read_text() if DOC.exists() else ""
        doc = render(results, d, existing)
    for case_id, found in bad.items():
        print(f"{case_id}: {'; '.join(found)}", file=sys.stderr)
    if "--check" in argv:
        if doc != existing:
            print(f"{DOC.relative_to(REPO)} is stale: run python tools/bad_inputs.py", file=sys.stderr)
            return 1
        return 1 if bad else 0
    DOC.write_text(doc)
    print(f"wrote {DOC.relative_to(REPO)} ({len(results)} cases)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

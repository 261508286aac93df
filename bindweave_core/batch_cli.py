"""``generate --batch CASES --out-dir DIR``: every case of a case file, models loaded once.

Order of work: read the case file (``batch_cases``) -> preflight every case before any model loads
(images and masks decode, settings in range, output names free; one report of all bad cases by id;
``--skip-bad`` runs the rest) -> join the torchrun world, cut it into groups of ``--sp-size`` ranks ->
scan the output folder for cases already done with the same settings (``batch_outputs``) -> each group
takes a static share of the cases still to do (``todo[group::groups]``) -> the models load once and the
group's cases run one after the other, each written atomically by the group's first rank; a case that
fails is recorded and the batch goes on -> global rank 0 writes the summary (CSV + Markdown) as its
cases finish and after all groups are done.

Seeds: a case without a ``seed`` uses ``--seed`` (default 1234, the official one), drawn afresh for each
case, so a case's video does not depend on which cases ran before it or on which rank ran it. The
official BindWeave script instead draws every case's noise from one generator seeded once, so its
second case's noise depends on the first: its videos after the first are not reproduced by this mode.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from .batch_cases import Case, read_cases
from .errors import BindWeaveError, GenerationCancelled, InputError
from .signals import exit_code, signal_name, terminate_as_interrupt

log = logging.getLogger("BindWeave")

EXIT_FAILED = 1  # some case failed at run time (the others were written)
# The final wait for the slowest group (every rank, before rank 0's last summary): a whole batch may take
# days, and a dead rank is torchrun's to notice (it stops the others), not this barrier's.
FINAL_WAIT = timedelta(days=7)


def add_batch_arguments(p: argparse.ArgumentParser) -> None:
    b = p.add_argument_group("batch (a case file in, every video out; see the README's Batches section)")
    b.add_argument("--batch", metavar="CASES",
                   help="an OpenS2V-Eval test_case.json or a .jsonl file (one case per line: id, prompt, refs, "
                        "optional masks, seed and per-case settings); replaces --ref/--prompt/--out (default: none, one video)")
    b.add_argument("--out-dir", metavar="DIR",
                   help="with --batch: where <id>.mp4, <id>.json and the summary go (no default: required with --batch)")
    b.add_argument("--images-root", metavar="DIR",
                   help="with --batch: folder the cases' relative image paths start from (default: the case file's)")
    b.add_argument("--skip-bad", action="store_true",
                   help="with --batch: run the good cases when the preflight finds bad ones (default: stop)")
    b.add_argument("--sp-size", type=int, default=1, metavar="N",
                   help="with --batch under torchrun: N ranks make one video together (with --parallel ulysses, "
                        "ring or cfg); the world's groups of N share the cases (default 1: one video per rank)")


def run_generate_or_batch(args: argparse.Namespace) -> int:
    """``generate``: the batch with ``--batch``, else the one video of ``--ref/--prompt/--out``."""
    from .generate_cli import run_generate

    if args.batch:
        return run_batch(args)
    batch_only = [flag for flag, given in (("--out-dir", args.out_dir), ("--images-root", args.images_root),
                                           ("--skip-bad", args.skip_bad), ("--sp-size", args.sp_size != 1)) if given]
    if batch_only:
        raise InputError(f"{', '.join(batch_only)} only work with --batch CASES; for one video use --out.")
    return run_generate(args)


# ---------------------------------------------------------------------------------- preflight
@dataclass
class PlannedCase:
    case: Case
    settings: Any = None  # GenerationSettings, None for a bad case
    digest: str | None = None
    inputs: dict[str, Any] | None = None  # what the digest is of (kept in the sidecar)
    problem: str | None = None

    @property
    def id(self) -> str:
        return self.case.id


@dataclass
class BatchPlan:
    cases: list[PlannedCase]
    out_dir: Path
    smoke: bool
    family: str
    inputs: dict[str, Any] = field(default_factory=dict)  # the digest's batch-wide part

    @property
    def good(self) -> list[PlannedCase]:
        return [c for c in self.cases if c.problem is None]


def preflight_batch(args: argparse.Namespace) -> BatchPlan:
    """Check every case before anything loads; :class:`InputError` listing each bad case by id (unless
    ``--skip-bad``, which logs the same list and keeps the good ones)."""
    from .dit.parallel import check_rank_groups
    from .generate_cli import PATH_ARGS, _lora_paths, resolve_model_args
    from .preflight import check_device, check_model_paths

    if not args.out_dir:
        raise InputError("--batch needs --out-dir DIR (where the videos, sidecars and summary go).")
    ignored = [flag for flag, value in (("--ref", args.ref), ("--mask", args.mask), ("--prompt", args.prompt),
                                        ("--prompt-file", args.prompt_file), ("--out", args.out)) if value]
    if ignored:
        raise InputError(f"--batch takes each case's prompt, references and output from the case file: drop "
                         f"{', '.join(ignored)}.")
    check_rank_groups(args.sp_size, args.parallel, int(os.environ.get("WORLD_SIZE", "1")))
    out_dir = _check_out_dir(args.out_dir)
    check_model_paths({**{f"--{n.replace('_', '-')}": getattr(args, n) for n in PATH_ARGS},
                       **{f"--lora {spec}": str(path) for spec, path in zip(args.lora, _lora_paths(args))}})
    check_device(args.device)
    smoke, family = resolve_model_args(args)
    plan = BatchPlan([PlannedCase(c) for c in read_cases(args.batch, args.images_root)], out_dir, smoke, family)
    plan.inputs = _batch_inputs(args, smoke, family)
    checker = _CaseChecker(args, plan)
    for planned in plan.cases:
        planned.problem = checker.check(planned)
    bad = [c for c in plan.cases if c.problem is not None]
    if bad:
        report = "\n".join(f"  {c.id}: {c.problem}" for c in bad)
        if not args.skip_bad or not plan.good:
            fix = "fix them, or pass --skip-bad to run the others" if plan.good else "fix them"
            raise InputError(f"{len(bad)} of {len(plan.cases)} cases in {args.batch} cannot run ({fix}); nothing "
                             f"was loaded or written:\n{report}")
        log.warning("--skip-bad: %d of %d cases cannot run and are skipped:\n%s", len(bad), len(plan.cases), report)
    return plan


def _check_out_dir(path: str) -> Path:
    from .preflight import _check_writable

    out_dir = Path(path).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out-dir {out_dir} is a file; give a folder (it is made if missing).")
    _check_writable(out_dir / "summary.csv", "--out-dir")
    return out_dir


def _batch_inputs(args: argparse.Namespace, smoke: bool, family: str) -> dict[str, Any]:
    """What decides every case's video besides the case itself: the models (files' sizes and hashes, or
    the smoke model and its seed), dtype, weight format, attention kernel, LoRAs, VAE tiling."""
    from .generate_cli import MODEL_ARGS, _lora_paths, file_fingerprint

    if smoke:
        models: dict[str, Any] = {"smoke": True, "seed": args.seed}
    else:
        names = MODEL_ARGS + ("planner_tokenizer", "text_tokenizer")
        models = {n: {k: v for k, v in file_fingerprint(getattr(args, n)).items() if k != "path"}
                  for n in names if getattr(args, n)}
    loras = [[spec, file_fingerprint(str(path)).get("sha256")] for spec, path in zip(args.lora, _lora_paths(args))]
    return {"models": models, "family": family, "dtype": args.dtype or _default_dtype(args),
            "weight_format": args.weight_format, "attention": args.attention, "loras": loras,
            "vae_tiling": args.vae_tiling}


def _default_dtype(args: argparse.Namespace) -> str:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return "bf16" if torch.device(device).type == "cuda" else "fp32"


class _CaseChecker:
    """The per-case preflight: images (each file decoded once), settings, output names."""

    def __init__(self, args: argparse.Namespace, plan: BatchPlan) -> None:
        from .families import family_for
        from .generate_cli import PATH_ARGS, generation_settings

        self.args, self.plan = args, plan
        self.family = family_for(plan.family)
        # the batch's own settings; each case replaces the prompt (a placeholder here: an empty one is refused)
        self.base = generation_settings(args, "(each case's prompt)", plan.family, plan.smoke)
        self.images: dict[Path, tuple[str | None, str | None]] = {}  # path -> (problem, sha256)
        self.inputs = [args.batch] + [getattr(args, n) for n in PATH_ARGS if getattr(args, n)]

    def check(self, planned: PlannedCase) -> str | None:
        case = planned.case
        if case.problems:
            return "; ".join(case.problems)
        problems = []
        if case.masks is not None and len(case.masks) != len(case.refs):
            problems.append(f"{len(case.masks)} masks for {len(case.refs)} references (give one mask per reference)")
        hashes = []
        for i, path in enumerate(case.refs + (case.masks or [])):
            what = f"reference image {i + 1}" if i < len(case.refs) else f"mask {i - len(case.refs) + 1}"
            problem, sha = self._image(path, what)
            problems += [problem] if problem else []
            hashes.append(sha)
        seed = case.seed if case.seed is not None else self.args.seed
        settings = None
        try:
            settings = replace(self.base, prompt=case.prompt, seed=seed, **case.settings)  # checks every value
            self.family.check_reference_count(len(case.refs))
            self.family.check_settings(settings)
            settings.validate(len(case.refs), self.family.max_references)
            if settings.mask_mode not in _mask_modes():
                raise InputError(f"mask_mode must be one of {_mask_modes()}, got {settings.mask_mode!r}")
            self._check_output(case)
        except InputError as e:
            problems.append(str(e))
        if problems:
            return "; ".join(problems)
        from .batch_outputs import settings_digest

        planned.settings = settings
        planned.inputs = {**self.plan.inputs, "settings": settings.to_dict(), "images": hashes}
        planned.digest = settings_digest(planned.inputs)
        return None

    def _image(self, path: Path, what: str) -> tuple[str | None, str | None]:
        """``(problem, sha256)``; each file is decoded once however many cases use it."""
        from .batch_outputs import file_sha256
        from .images import open_image

        if path not in self.images:
            try:
                open_image(path, "{what}")
                self.images[path] = (None, file_sha256(path))
            except InputError as e:
                self.images[path] = (str(e) + _case_hint(path), None)
        problem, sha = self.images[path]
        return (problem.replace("{what}", what) if problem else None), sha

    def _check_output(self, case: Case) -> None:
        from .batch_outputs import outputs
        from .preflight import check_output_paths

        video, _ = outputs(self.plan.out_dir, case.id)
        check_output_paths(video, [*self.inputs, *case.refs, *(case.masks or [])], flag="output")


def _mask_modes() -> tuple[str, ...]:
    from . import constants as C

    return tuple(C.MASK_MODES)


def _case_hint(path: Path) -> str:
    """Names differ only in upper/lower case (OpenS2V-Eval's files say ``Images/``): say so."""
    folder = path.parent
    if folder.parent.is_dir() and not folder.exists():
        near = [p.name for p in folder.parent.iterdir() if p.name.lower() == folder.name.lower()]
        if near:
            return (f" (there is a folder {folder.parent / near[0]}: names are case-sensitive; point --images-root "
                    f"at a folder holding {folder.name}/)")
    return ""


# ---------------------------------------------------------------------------------- the run
@dataclass
class BatchProgress:
    """The batch's progress line (cases done/total, failures, ETA), logged above each case's stages."""

    total: int
    already: int  # done by an earlier run, skipped
    done: int = 0
    failed: int = 0
    seconds: float = 0.0

    def line(self, planned: PlannedCase) -> str:
        finished = self.done + self.failed
        eta = "?" if not finished else _clock(self.seconds / finished * (self.total - finished))
        return (f"batch: case {finished + 1} of {self.total} ({planned.id}); {self.done} done, {self.failed} failed"
                f"{f', {self.already} done before' if self.already else ''}; ETA {eta}")


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def run_batch(args: argparse.Namespace) -> int:
    """Every case of ``args.batch`` (see the module docstring); exit code 1 when a case failed."""
    from .batch_outputs import read_done

    plan = preflight_batch(args)
    if args.offload is None:
        args.offload = "model"  # every model loads once and waits in CPU memory between its uses
    group, coord = _join_world(args)
    todo = [c for c in plan.good if read_done(plan.out_dir, c.id, c.digest) is None]
    _barrier(coord)  # every rank has read the folder before any rank writes to it
    share = todo[group.index::group.count]  # static and disjoint: the same on every rank
    writer, summary = group.local_rank == 0, _global_rank() == 0
    if summary:
        _write_summary(plan)
        log.info("batch %s: %d cases, %d bad, %d already done with the same settings, %d to do over %d group(s) of "
                 "%d rank(s)", args.batch, len(plan.cases), len(plan.cases) - len(plan.good),
                 len(plan.good) - len(todo), len(todo), group.count, group.size)
    progress = BatchProgress(total=len(share), already=len(plan.good) - len(todo))
    stage = "loading models"
    with terminate_as_interrupt():  # SIGTERM raises Terminated, a KeyboardInterrupt (bindweave_core.signals)
        try:
            pipe, model_info = _load_models(args) if share else (None, {})  # nothing to do: nothing to load
            for planned in share:
                stage = f"during case {planned.id} (its files were not written)"
                if writer:
                    log.info("%s", progress.line(planned))
                t0 = time.perf_counter()
                error = _run_case(pipe, planned, args, plan, writer, model_info)
                progress.seconds += time.perf_counter() - t0
                progress.done, progress.failed = progress.done + (error is None), progress.failed + (error is not None)
                if summary:
                    _write_summary(plan)
        except KeyboardInterrupt as e:
            raise _stopped(e, stage, progress, plan, summary) from None
    return _finish(plan, coord, summary, progress)


def _join_world(args: argparse.Namespace):
    """``(this rank's RankGroup, the gloo group for the final wait or None)``; under torchrun each rank
    takes its own device (``LOCAL_RANK``'s GPU, else the CPU over gloo)."""
    import torch

    from .dit.parallel import init_distributed, init_rank_groups

    coord = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        _, _, rank_device = init_distributed()
        if args.device is not None and torch.device(args.device).type != rank_device.type:
            raise InputError(f"--device {args.device} does not match this rank's device {rank_device.type}")
        args.device = str(rank_device)
        coord = dist.new_group(backend="gloo", timeout=FINAL_WAIT)
    return init_rank_groups(args.sp_size, args.parallel, torch.device(args.device or "cpu")), coord


def _global_rank() -> int:
    from .dit.parallel import rank

    return rank()


def _barrier(coord: Any) -> None:
    if coord is not None:
        import torch.distributed as dist

        dist.barrier(group=coord)


def _load_models(args: argparse.Namespace):
    from .generate_cli import build_pipeline

    pipe, model_info = build_pipeline(args)
    if args.lora:
        from .lora_specs import add_loras

        add_loras(pipe, args.lora)
        model_info["loras"] = list(args.lora)
    return pipe, model_info


def _run_case(pipe: Any, planned: PlannedCase, args: argparse.Namespace, plan: BatchPlan, writer: bool,
              model_info: dict[str, Any]) -> str | None:
    """One case: generate on every rank of the group, the group's first rank writes. None, or the error
    (recorded in ``failures/<id>.json``; the batch goes on)."""
    from .batch_outputs import clear_failure, outputs, record_failure
    from .generate_cli import StageDisplay, write_outputs

    case, settings = planned.case, planned.settings
    display = StageDisplay(settings.steps) if writer else None
    t0 = time.perf_counter()
    try:
        result = pipe.generate([str(r) for r in case.refs], settings,
                               masks=[str(m) for m in case.masks] if case.masks else None,
                               callback=display.progress if display else None,
                               on_stage=display.on_stage if display else None)
        if writer:
            seconds = round(time.perf_counter() - t0, 2)
            display.on_stage("writing")
            video, sidecar = outputs(plan.out_dir, case.id)
            write_outputs(pipe, result, video, sidecar, references=[str(r) for r in case.refs],
                          evaluate=bool(getattr(args, "evaluate", False)), smoke=plan.smoke, sidecar={
                "batch": {"id": case.id, "case_file": str(args.batch), "digest": planned.digest,
                          "inputs": planned.inputs, "seconds": seconds},
                "references": [str(r) for r in case.refs], "masks": [str(m) for m in case.masks or []],
                "models": model_info, "family": pipe.dit_family, "dtype": plan.inputs["dtype"],
                "weight_format": args.weight_format, "attention": args.attention, "runtime": pipe.runtime.to_dict()})
            clear_failure(plan.out_dir, case.id)
        return None
    except Exception as e:  # noqa: BLE001 -- any failure of one case is recorded; the batch goes on
        message = str(e) or type(e).__name__
        if not isinstance(e, BindWeaveError):
            log.debug("case %s failed", case.id, exc_info=True)
            message = f"{type(e).__name__}: {message}"
        if writer:
            record_failure(plan.out_dir, case.id, planned.digest, message, time.perf_counter() - t0, settings.seed)
        log.error("case %s failed: %s (recorded; the batch goes on)", case.id, message)
        return message
    finally:
        if display is not None:
            display.close()


def _summary_cases(plan: BatchPlan) -> list[tuple[str, str | None, int | None, str | None]]:
    return [(c.id, c.digest, c.settings.seed if c.settings is not None else None, c.problem) for c in plan.cases]


def _write_summary(plan: BatchPlan) -> list[dict[str, Any]]:
    from .batch_outputs import summary_rows, write_summary

    rows = summary_rows(plan.out_dir, _summary_cases(plan))
    write_summary(plan.out_dir, rows)
    return rows


def _stopped(e: BaseException, stage: str, progress: BatchProgress, plan: BatchPlan,
             summary: bool) -> GenerationCancelled:
    if summary:
        _write_summary(plan)
    return GenerationCancelled(
        f"stopped by {signal_name(e)} {stage}; {progress.done} case(s) of this run were written, each complete. "
        f"Run the same command again to do the rest (finished cases are skipped).", exit_code(e))


def _finish(plan: BatchPlan, coord: Any, summary: bool, progress: BatchProgress) -> int:
    """Wait for every group, write the final summary (rank 0), close the process group; the exit code."""
    _barrier(coord)
    failed = progress.failed
    if summary:
        rows = _write_summary(plan)
        failed = [r["id"] for r in rows if r["status"] == "failed"]
        done = sum(r["status"] == "done" for r in rows)
        log.info("batch done: %d of %d cases written%s; summary in %s", done, len(rows),
                 f", {len(failed)} failed ({', '.join(failed)})" if failed else "", plan.out_dir / "summary.md")
        bad = [r["id"] for r in rows if r["status"] == "bad"]
        if bad:
            log.warning("%d case(s) skipped by the preflight (--skip-bad): %s", len(bad), ", ".join(bad))
    if coord is not None:
        import torch.distributed as dist

        dist.destroy_process_group()
    return EXIT_FAILED if failed else 0

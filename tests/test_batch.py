"""``generate --batch``: the OpenS2V-Eval sample cases with the smoke model at 32x32, 5 frames, 2 steps.

One process: every case written with a summary, a rerun skips them all (nothing loads), a changed prompt
or a tampered sidecar reruns only its case, a case failing at run time is recorded and the batch goes
on, the preflight names every bad case before any model loads, SIGTERM stops with 143 and a rerun
finishes. torchrun on 2 CPU processes (gloo): the same videos as one process, frame for frame, each
case made once (one video per rank, then both ranks on one video with Ulysses); a rank killed
mid-batch, and a rerun with another world size finishes the rest.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import SAMPLES, need

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--smoke", "--width", "32", "--height", "32", "--frames", "5", "--steps", "2"]
IDS = ("faceobj_1", "singleface_1", "multihuman_14")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _cases(tmp_path: Path) -> tuple[Path, Path]:
    """The official test_case.json and an images root where its ``Images/...`` paths resolve."""
    need(SAMPLES / "test_case.json")
    root = tmp_path / "eval"
    root.mkdir()
    shutil.copy(SAMPLES / "test_case.json", root / "test_case.json")
    (root / "Images").symlink_to((SAMPLES / "images").resolve(), target_is_directory=True)
    return root / "test_case.json", root


def _batch(cases: Path, out: Path, *extra: str) -> int:
    from bindweave_core.cli import main

    return main(["generate", "--batch", str(cases), "--out-dir", str(out), *SMALL, *extra])


def _summary(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "summary.csv", newline="") as f:
        return {row["id"]: row for row in csv.DictReader(f)}


def _frames(path: Path) -> np.ndarray:
    from bindweave_core.video_io import read_video

    return read_video(path)[0]


def _mtimes(out: Path) -> dict[str, int]:
    return {i: (out / f"{i}.mp4").stat().st_mtime_ns for i in IDS if (out / f"{i}.mp4").exists()}


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """The official sample cases made once by one process: ``(case file, output folder, frames by id)``."""
    tmp = tmp_path_factory.mktemp("single")
    cases, _ = _cases(tmp)
    assert _batch(cases, tmp / "out") == 0
    return cases, tmp / "out", {i: _frames(tmp / "out" / f"{i}.mp4") for i in IDS}


def test_batch_writes_every_case_resumes_and_reruns_only_what_changed(tmp_path, caplog, single_process):
    caplog.set_level(logging.INFO, logger="BindWeave")
    cases, _ = _cases(tmp_path)
    out = tmp_path / "out"
    shutil.copytree(single_process[1], out)  # the first run (3 cases, exit 0) is the module's fixture
    rows = _summary(out)
    assert list(rows) == list(IDS) and {r["status"] for r in rows.values()} == {"done"}
    assert {r["seed"] for r in rows.values()} == {"1234"}  # no seed in the file: the official default
    assert (out / "summary.md").read_text().count("| done |") == 3
    videos = single_process[2]
    assert all(v.shape == (5, 32, 32, 3) for v in videos.values())
    assert not np.array_equal(videos["faceobj_1"], videos["singleface_1"])  # the cases' inputs matter
    sidecar = json.loads((out / "faceobj_1.json").read_text())
    assert sidecar["seed"] == 1234 and sidecar["batch"]["id"] == "faceobj_1"
    assert sidecar["prompt_used"] == "a man playing with his dog in front of the house"

    before = _mtimes(out)
    caplog.clear()
    assert _batch(cases, out) == 0  # everything done: skipped, no model loaded
    assert _mtimes(out) == before
    assert "3 already done with the same settings, 0 to do" in caplog.text and "conditioning" not in caplog.text

    data = json.loads(cases.read_text())
    data["singleface_1"]["prompt"] = "a man waves in the snow"
    cases.write_text(json.dumps(data))
    caplog.clear()
    assert _batch(cases, out) == 0
    after = _mtimes(out)
    assert [i for i in IDS if after[i] != before[i]] == ["singleface_1"]
    assert json.loads((out / "singleface_1.json").read_text())["prompt_used"] == "a man waves in the snow"

    # a sidecar whose stored inputs no longer match its digest is not trusted: that case runs again
    tampered = json.loads((out / "faceobj_1.json").read_text())
    tampered["batch"]["inputs"]["settings"]["seed"] = 7
    (out / "faceobj_1.json").write_text(json.dumps(tampered))
    assert _batch(cases, out) == 0
    assert [i for i in IDS if _mtimes(out)[i] != after[i]] == ["faceobj_1"]
    assert np.array_equal(_frames(out / "faceobj_1.mp4"), videos["faceobj_1"])  # same settings, same video


def test_jsonl_seed_and_settings_per_case_and_a_failing_case_is_recorded(tmp_path, monkeypatch):
    from bindweave_core.pipeline import BindWeavePipeline

    need(SAMPLES / "images" / "man.png")
    man = str(SAMPLES / "images" / "man.png")
    lines = [{"id": "plain", "prompt": "a man", "refs": [man]},
             {"id": "seeded", "prompt": "a man", "refs": [man], "seed": 5, "frames": 9},
             {"id": "boom", "prompt": "explode", "refs": [man]}]
    cases = tmp_path / "cases.jsonl"
    cases.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    original = BindWeavePipeline.generate

    def generate(self, references, settings, *args, **kwargs):
        if settings.prompt == "explode":
            raise RuntimeError("simulated failure")
        return original(self, references, settings, *args, **kwargs)

    monkeypatch.setattr(BindWeavePipeline, "generate", generate)
    out = tmp_path / "out"
    assert _batch(cases, out) == 1  # one case failed: non-zero, the others written
    rows = _summary(out)
    assert [rows[i]["status"] for i in ("plain", "seeded", "boom")] == ["done", "done", "failed"]
    assert rows["seeded"]["seed"] == "5" and "simulated failure" in rows["boom"]["error"]
    assert _frames(out / "seeded.mp4").shape[0] == 9 and _frames(out / "plain.mp4").shape[0] == 5
    assert json.loads((out / "failures" / "boom.json").read_text())["error"] == "RuntimeError: simulated failure"
    assert not (out / "boom.mp4").exists()
    monkeypatch.setattr(BindWeavePipeline, "generate", original)
    assert _batch(cases, out) == 0  # the failed case is retried, the failure record removed
    assert _summary(out)["boom"]["status"] == "done" and not (out / "failures" / "boom.json").exists()


def test_preflight_names_every_bad_case_before_any_model_loads(tmp_path, monkeypatch, capsys):
    import bindweave_core.generate_cli as generate_cli

    need(SAMPLES / "images" / "man.png")
    man = str(SAMPLES / "images" / "man.png")
    lines = [{"id": "good", "prompt": "a man", "refs": [man]},
             {"id": "missing_image", "prompt": "a man", "refs": [man, str(tmp_path / "nowhere.png")]},
             {"id": "bad_size", "prompt": "a man", "refs": [man], "width": 100}]
    cases = tmp_path / "cases.jsonl"
    cases.write_text("\n".join(json.dumps(line) for line in lines))

    def no_loading(args):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(generate_cli, "build_pipeline", no_loading)
    out = tmp_path / "out"
    assert _batch(cases, out) == 2
    err = capsys.readouterr().err
    assert "2 of 3 cases" in err and "--skip-bad" in err
    assert re.search(r"missing_image: reference image 2 not found: .*nowhere\.png", err)
    assert re.search(r"bad_size: width must be a multiple of 16 .*got 100", err)
    assert "good:" not in err and not out.exists()

    monkeypatch.undo()
    assert _batch(cases, out, "--skip-bad") == 0
    rows = _summary(out)
    assert [rows[i]["status"] for i in ("good", "missing_image", "bad_size")] == ["done", "bad", "bad"]
    assert sorted(p.name for p in out.glob("*.mp4")) == ["good.mp4"]


def _man_cases(tmp_path: Path, count: int) -> tuple[Path, list[str]]:
    need(SAMPLES / "images" / "man.png")
    ids = [f"case{i}" for i in range(count)]
    cases = tmp_path / "cases.jsonl"
    cases.write_text("\n".join(json.dumps({"id": i, "prompt": f"a man, take {i}", "refs": [str(SAMPLES / "images" /
                                                                                            "man.png")]})
                               for i in ids))
    return cases, ids


def test_sigterm_stops_cleanly_and_the_rerun_finishes(tmp_path):
    cases, ids = _man_cases(tmp_path, 3)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "bindweave_core", "generate", "--batch", str(cases), "--out-dir", str(out), *SMALL,
           "--steps", "12"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: (out / "case0.json").exists(), proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-2000:]
    assert re.search(r"stopped by SIGTERM during case \w+ \(its files were not written\); 1 case\(s\) of this run "
                     r"were written", err), err[-2000:]
    assert "Run the same command again" in err
    assert not list(out.glob(".*tmp*"))  # no partial file left behind
    assert _summary(out)["case0"]["status"] == "done" and _summary(out)["case2"]["status"] == "pending"
    done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "1 already done with the same settings, 2 to do" in done.stderr
    assert {r["status"] for r in _summary(out).values()} == {"done"}


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, "the run ended before the condition was met"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# ------------------------------------------------------------------------------------------ torchrun
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(cases: Path, out: Path, *extra: str, nproc: int = 2, wait: bool = True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
           str(_free_port()), "-m", "bindweave_core", "generate", "--batch", str(cases), "--out-dir", str(out),
           *SMALL, *extra]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=400)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [(), ("--sp-size", "2", "--parallel", "ulysses")], ids=["sp1", "sp2-ulysses"])
def test_torchrun_two_processes_write_the_videos_of_one_process_each_once(tmp_path, single_process, extra):
    cases, _, expected = single_process
    out = tmp_path / "out"
    run = _torchrun(cases, out, *extra)
    assert run.returncode == 0, run.stderr[-3000:]
    started = re.findall(r"batch: case \d+ of \d+ \((\w+)\)", run.stderr)
    assert sorted(started) == sorted(IDS)  # each case made by exactly one group (its writing rank logs it)
    if extra:
        assert "context parallel: 2 ranks (ulysses 2 x ring 1)" in run.stderr
    else:
        assert "over 2 group(s) of 1 rank(s)" in run.stderr
    for i in IDS:
        assert np.array_equal(_frames(out / f"{i}.mp4"), expected[i]), i
    assert {r["status"] for r in _summary(out).values()} == {"done"}


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@pytest.mark.slow
def test_a_rank_killed_mid_batch_and_a_rerun_with_another_world_size_finishes(tmp_path):
    cases, ids = _man_cases(tmp_path, 5)
    out = tmp_path / "out"
    proc = _torchrun(cases, out, "--steps", "6", wait=False)
    try:
        _wait_for(lambda: any(out.glob("*.json")), proc)
        workers = _children(proc.pid)
        assert len(workers) == 2, workers
        os.kill(workers[-1], signal.SIGKILL)  # one rank dies mid-batch; torchrun stops the other
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    finished = {p.stem for p in out.glob("*.json")}
    assert finished and set(ids) - finished  # some done, some not: the kill landed mid-batch
    before = {i: (out / f"{i}.mp4").stat().st_mtime_ns for i in finished}
    rerun = _batch(cases, out, "--steps", "6")  # one process now
    assert rerun == 0
    assert {i: (out / f"{i}.mp4").stat().st_mtime_ns for i in finished} == before  # not made again
    assert {r["status"] for r in _summary(out).values()} == {"done"} and len(_summary(out)) == 5


# ------------------------------------------------------------------------------------------ case files
def test_case_files_read_both_formats_and_keep_every_problem_by_id(tmp_path):
    from bindweave_core.batch_cases import read_cases
    from bindweave_core.errors import InputError

    opens2v = tmp_path / "test_case.json"
    opens2v.write_text(json.dumps({"a_1": {"img_paths": ["Images/x.jpg"], "prompt": "p", "class_label": ["Man"],
                                           "synthesis_flag": "True", "width": 64}}))
    (tmp_path / "root").mkdir()
    (case,) = read_cases(opens2v, tmp_path / "root")
    assert case.id == "a_1" and case.refs == [tmp_path / "root" / "Images" / "x.jpg"]
    assert case.settings == {"width": 64} and case.seed is None and not case.problems
    assert read_cases(opens2v)[0].refs == [tmp_path / "Images" / "x.jpg"]  # default root: the file's folder

    lines = tmp_path / "cases.jsonl"
    lines.write_text("\n".join([
        json.dumps({"id": "ok", "prompt": "p", "refs": ["/abs/r.png"], "masks": ["m.png"], "seed": 3, "frames": 9}),
        json.dumps({"id": "OK", "prompt": "p", "refs": ["r.png"]}),
        json.dumps({"id": "../up", "prompt": "p", "refs": ["r.png"]}),
        json.dumps({"id": "typo", "prompt": "p", "refs": ["r.png"], "widht": 64, "steps": "4"}),
        json.dumps({"prompt": "p", "refs": []}),
        "{not json",
    ]))
    cases = {c.id: c for c in read_cases(lines)}
    ok = cases["ok"]
    assert ok.refs == [Path("/abs/r.png")] and ok.masks == [tmp_path / "m.png"] and ok.seed == 3
    assert ok.settings == {"num_frames": 9} and not ok.problems
    assert "same output file as case ok" in cases["OK"].problems[0]
    assert "letters, digits" in cases["../up"].problems[0]
    assert any("unknown key(s) widht" in p for p in cases["typo"].problems)
    assert any("steps must be a whole number, got '4'" in p for p in cases["typo"].problems)
    assert any("no \"id\"" in p for p in cases["line 5"].problems)
    assert any("non-empty list" in p for p in cases["line 5"].problems)
    assert "not valid JSON" in cases["line 6"].problems[0]

    twice = tmp_path / "twice.json"
    twice.write_text('{"a": {"img_paths": ["x"], "prompt": "p"}, "a": {"img_paths": ["y"], "prompt": "q"}}')
    with pytest.raises(InputError, match="appear twice"):
        read_cases(twice)


def test_ctrl_c_stops_with_130_and_keeps_the_finished_cases(tmp_path, monkeypatch, capsys):
    from bindweave_core.pipeline import BindWeavePipeline

    cases, _ = _man_cases(tmp_path, 2)
    original = BindWeavePipeline.generate

    def generate(self, references, settings, *args, **kwargs):
        if settings.prompt.endswith("take case1"):
            raise KeyboardInterrupt  # what Ctrl-C raises in the main thread
        return original(self, references, settings, *args, **kwargs)

    monkeypatch.setattr(BindWeavePipeline, "generate", generate)
    out = tmp_path / "out"
    assert _batch(cases, out) == 130
    err = capsys.readouterr().err
    assert "stopped by Ctrl-C during case case1 (its files were not written); 1 case(s) of this run were written" in err
    assert (out / "case0.mp4").exists() and not (out / "case1.mp4").exists()
    assert [r["status"] for r in _summary(out).values()] == ["done", "pending"]


def test_evaluate_scores_each_case_into_its_sidecar_and_the_summary(tmp_path):
    """generate --batch --evaluate: each case's sidecar holds the evaluation report of its video, and the
    summary gets one column per metric with the report's overall value."""
    need(SAMPLES / "images" / "man.png")
    cases = tmp_path / "cases.jsonl"
    cases.write_text(json.dumps({"id": "one", "prompt": "a man walks", "refs": [str(SAMPLES / "images" / "man.png")]}))
    out = tmp_path / "out"
    assert _batch(cases, out, "--evaluate") == 0
    evaluation = json.loads((out / "one.json").read_text())["evaluation"]
    row = _summary(out)["one"]
    overall = {k: v["overall"] for k, v in evaluation["metrics"].items() if v.get("overall") is not None}
    assert {"clip_i", "temporal_flickering"} <= set(overall)
    assert {k: float(row[f"metric:{k}"]) for k in overall} == pytest.approx(overall)

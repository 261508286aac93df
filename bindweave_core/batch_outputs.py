"""What a ``generate --batch`` output folder holds, and how a rerun reads it back.

Per case ``<id>.mp4`` and its sidecar ``<id>.json`` (the video is renamed into place first, the sidecar
last: a case is done only once its sidecar is there). The sidecar's ``batch`` entry holds the *settings
digest*, the sha256 of everything that decides the video (settings with prompt and seed, the reference
and mask files' bytes, the models, dtype, weight format, attention kernel, LoRAs), and those inputs
themselves; ``video_sha256`` is the video's hash. A rerun counts a case done only when the digest
recomputed from the stored inputs equals the stored digest, equals the case's digest now, and the video's
hash matches: anything else (changed settings, a hand-edited or cut sidecar, a replaced video) runs again.
How the work was spread (world size, ``--sp-size``, offload, compile) is not part of the digest, so a
rerun with another number of processes resumes.

A case that failed at run time leaves ``failures/<id>.json`` (its digest and the error); it is retried
by the next run and removed when it succeeds. ``summary.csv`` and ``summary.md`` are rebuilt from these
files (atomically) whenever the writing rank finishes a case, and once more at the end.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path
from typing import Any

from .video_io import atomic_path, write_json

SUMMARY_COLUMNS = ("id", "status", "seconds", "seed", "error")
FAILURES = "failures"


def settings_digest(inputs: dict[str, Any]) -> str:
    """sha256 of the inputs that decide a case's video (JSON with sorted keys)."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def outputs(out_dir: Path, case_id: str) -> tuple[Path, Path]:
    """``(video, sidecar)`` of a case."""
    return out_dir / f"{case_id}.mp4", out_dir / f"{case_id}.json"


def read_done(out_dir: Path, case_id: str, digest: str | None = None) -> dict[str, Any] | None:
    """The case's sidecar if its outputs are complete and verified (and made with ``digest`` when given)."""
    video, sidecar = outputs(out_dir, case_id)
    try:
        data = json.loads(sidecar.read_text())
        batch = data["batch"]
        stored = batch["digest"]
        if settings_digest(batch["inputs"]) != stored or (digest is not None and stored != digest):
            return None
        if not video.is_file() or _video_hash(video) != data["video_sha256"]:
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return data


_HASHES: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256: each summary re-reads the folder


def _video_hash(video: Path) -> str:
    st = video.stat()
    key = (str(video), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = file_sha256(video)
    return _HASHES[key]


def failure_path(out_dir: Path, case_id: str) -> Path:
    return out_dir / FAILURES / f"{case_id}.json"


def record_failure(out_dir: Path, case_id: str, digest: str, error: str, seconds: float, seed: int) -> None:
    write_json({"id": case_id, "digest": digest, "error": error, "seconds": round(seconds, 2), "seed": seed},
               failure_path(out_dir, case_id))


def clear_failure(out_dir: Path, case_id: str) -> None:
    failure_path(out_dir, case_id).unlink(missing_ok=True)


def read_failure(out_dir: Path, case_id: str, digest: str) -> dict[str, Any] | None:
    try:
        data = json.loads(failure_path(out_dir, case_id).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("digest") == digest else None


def summary_rows(out_dir: Path, cases: list[tuple[str, str | None, int | None, str | None]]) -> list[dict[str, Any]]:
    """One row per case ``(id, digest, seed, preflight problem)``, from what the folder holds now:
    done, failed, bad (refused by the preflight) or pending (not made yet, or made with other settings)."""
    rows = []
    for case_id, digest, seed, problem in cases:
        row: dict[str, Any] = {"id": case_id, "status": "pending", "seconds": "", "seed": "" if seed is None else seed,
                               "error": ""}
        if problem is not None:
            row.update(status="bad", error=problem)
        elif (done := read_done(out_dir, case_id, digest)) is not None:
            row.update(status="done", seconds=done["batch"].get("seconds", ""))
            row.update({f"metric:{k}": v for k, v in evaluation_summary(done.get("evaluation")).items()})
        elif digest is not None and (failed := read_failure(out_dir, case_id, digest)) is not None:
            row.update(status="failed", seconds=failed.get("seconds", ""), error=failed.get("error", ""))
        rows.append(row)
    return rows


def write_summary(out_dir: Path, rows: list[dict[str, Any]]) -> tuple[Path, Path]:
    """``summary.csv`` and ``summary.md`` (columns: id, status, seconds, seed, error, then any metrics)."""
    metrics = sorted({k for row in rows for k in row if k.startswith("metric:")})
    columns = list(SUMMARY_COLUMNS) + metrics
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("done", "failed", "bad", "pending")}
    lines = [f"# Batch summary: {len(rows)} cases, " + ", ".join(f"{n} {s}" for s, n in counts.items()), "",
             "| " + " | ".join(c.removeprefix("metric:") for c in columns) + " |",
             "|" + " --- |" * len(columns)]
    for row in rows:
        cells = [str(row.get(c, "")).replace("|", "\\|").replace("\n", " ") for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    csv_path, md_path = out_dir / "summary.csv", out_dir / "summary.md"
    for path, text in ((csv_path, buffer.getvalue()), (md_path, "\n".join(lines) + "\n")):
        with atomic_path(path) as tmp:
            tmp.write_text(text)
    return csv_path, md_path


def evaluation_summary(evaluation: dict[str, Any] | None) -> dict[str, float]:
    """The overall value of each metric of a sidecar's ``evaluation`` (``generate --evaluate``) for the
    summary's columns; none without an evaluation."""
    metrics = (evaluation or {}).get("metrics") or {}
    return {name: m["overall"] for name, m in sorted(metrics.items())
            if isinstance(m, dict) and isinstance(m.get("overall"), (int, float))}

"""Face similarity with InsightFace's ArcFace (optional extra: ``pip install insightface onnxruntime``).

The user gives the model pack's folder (e.g. ``~/.insightface/models/buffalo_l`` with its ``.onnx`` files);
nothing is downloaded: the folder must hold the models already. InsightFace's pretrained model packs are
licensed for non-commercial research only (see InsightFace's README); the code is MIT.
Per reference: the largest face detected in the reference is embedded; per sampled frame, every detected face
is embedded and the frame's score is the best cosine to the reference face. The detection rate is the share of
sampled frames with at least one face.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError

log = logging.getLogger("BindWeave")

LICENCE = "InsightFace model packs are licensed for non-commercial research use only"
DETECTION_SIZE = (640, 640)
INSTALL = "pip install insightface onnxruntime"


def missing_package() -> str | None:
    """The one-line reason face similarity cannot run here, or None."""
    absent = [name for name in ("insightface", "onnxruntime") if importlib.util.find_spec(name) is None]
    if absent:
        return f"face similarity not computed: {' and '.join(absent)} not installed ({INSTALL}; {LICENCE})"
    return None


def check_face_dir(path: str | Path) -> Path:
    """The model pack folder, checked before anything loads: it must exist and hold ``.onnx`` models (so
    InsightFace never downloads)."""
    p = Path(path)
    if not p.is_dir() or not any(p.glob("*.onnx")):
        raise InputError(f"face model folder {p}: no .onnx models there. Give an InsightFace model pack folder "
                         "(e.g. .../models/buffalo_l, unzipped), or leave it out to skip face similarity.")
    return p


class FaceScorer:
    """ArcFace embeddings of the faces InsightFace finds (its detection + recognition models only)."""

    def __init__(self, folder: str | Path) -> None:
        from insightface.app import FaceAnalysis

        folder = check_face_dir(folder)
        # FaceAnalysis reads root/models/name and downloads only when that folder is absent (it is not).
        self.app = FaceAnalysis(name=folder.name, root=str(folder.parent.parent),
                                allowed_modules=["detection", "recognition"], providers=["CPUExecutionProvider"])
        self.app.prepare(ctx_id=-1, det_size=DETECTION_SIZE)
        self.source = str(folder)

    def embeddings(self, image_rgb: np.ndarray) -> list[np.ndarray]:
        """Normalised embeddings of the faces in an RGB uint8 image, largest face first."""
        faces = self.app.get(np.ascontiguousarray(image_rgb[..., ::-1]))  # InsightFace reads BGR
        faces.sort(key=lambda f: -float((f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1])))
        return [np.asarray(f.normed_embedding, dtype=np.float64) for f in faces]


def face_scores(scorer: Any, frames: np.ndarray, references: list[np.ndarray]) -> list[dict[str, Any]]:
    """Per reference: its per-frame best face cosine (None where the frame has no face) and detection rate."""
    frame_faces = [scorer.embeddings(f) for f in frames]
    detected = sum(1 for faces in frame_faces if faces)
    out = []
    for ref in references:
        ref_faces = scorer.embeddings(ref)
        if not ref_faces:
            out.append({"reference_has_face": False, "values": [None] * len(frames), "mean": None,
                        "detection_rate": detected / len(frames)})
            continue
        values = [max(float(ref_faces[0] @ e) for e in faces) if faces else None for faces in frame_faces]
        found = [v for v in values if v is not None]
        out.append({"reference_has_face": True, "values": values, "mean": float(np.mean(found)) if found else None,
                    "detection_rate": detected / len(frames)})
    return out

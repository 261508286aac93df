"""What a model file is, judged by its first bytes (never by its name)."""

from __future__ import annotations

import json
from pathlib import Path

SAFETENSORS = "safetensors"
GGUF = "gguf"
PICKLE = "pickle"  # torch.save zip archive or a legacy pickle stream
UNKNOWN = "unknown"

GGUF_MAGIC = b"GGUF"
_ZIP_MAGIC = b"PK"
_PICKLE_PROTOCOL = 0x80  # first byte of a pickle of protocol >= 2
_MAX_HEADER = 100 << 20  # safetensors refuses larger headers too


def sniff(path: Path) -> str:
    """``safetensors`` / ``gguf`` / ``pickle`` / ``unknown`` from the file's content."""
    with open(path, "rb") as fh:
        head = fh.read(9)
    if head.startswith(GGUF_MAGIC):
        return GGUF
    # before the pickle test: a header length's low byte may well be 0x80
    if len(head) == 9 and 0 < int.from_bytes(head[:8], "little") <= _MAX_HEADER and head[8:9] == b"{":
        return SAFETENSORS
    if head.startswith(_ZIP_MAGIC) or (head[:1] and head[0] == _PICKLE_PROTOCOL):
        return PICKLE
    return UNKNOWN


def what_it_is(path: Path) -> str:
    """A short description of an unrecognised file for error messages: size and first bytes."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(16)
    printable = "".join(chr(b) if 32 <= b < 127 else "." for b in head)
    return f"{size:,} bytes starting with {head.hex(' ')} ({printable!r})"


def safetensors_header_ok(path: Path) -> bool:
    """The first-bytes test plus a JSON header that parses (for files named ``.safetensors``)."""
    if sniff(path) != SAFETENSORS:
        return False
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        try:
            json.loads(fh.read(n))
        except ValueError:
            return False
    return True

"""Reading small text files (configuration, profiles) defensively: size first, then UTF-8."""

from __future__ import annotations

import os
from pathlib import Path


def read_text_file(path: Path, *, max_bytes: int, what: str) -> str:
    """The UTF-8 text of ``path``; ValueError naming the file when it is missing, larger than
    ``max_bytes`` (checked before reading), binary (NUL bytes) or not UTF-8."""
    try:
        with path.open("rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size > max_bytes:
                raise ValueError(
                    f"{path}: {what} is {size} bytes, more than the {max_bytes} allowed"
                )
            data = fh.read(max_bytes + 1)
    except FileNotFoundError:
        raise ValueError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: {what} is a directory") from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot read: {exc.strerror}") from None
    if len(data) > max_bytes:  # grew while being read, or not a regular file
        raise ValueError(f"{path}: {what} is more than the {max_bytes} bytes allowed")
    if b"\x00" in data:
        raise ValueError(f"{path}: {what} is binary, not text (NUL bytes)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: {what} is not UTF-8 text (byte {exc.start})") from None

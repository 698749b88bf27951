"""The captions file of a dataset split (written by ``python -m generator.caption``, read by the readers).

JSON lines, one per image: ``{"image_id": int, "file_name": str, "raw": str, "caption": str}``; ``file_name``
is the image's name within the split's image folder, ``caption`` the hand-related sentences of the model's
answer ``raw`` (may be empty). Default place: ``<root>/annotations/attentionhand_captions_<split>.jsonl``.
"""
from __future__ import annotations

import json
from pathlib import Path

__all__ = ["default_captions_path", "read_captions", "load_captions"]


def default_captions_path(root: str | Path, split: str) -> Path:
    """Where the captions of ``split`` live by default: ``<root>/annotations/attentionhand_captions_<split>.jsonl``."""
    return Path(root) / "annotations" / f"attentionhand_captions_{split}.jsonl"


def read_captions(path: str | Path, *, repair: bool = False) -> list[dict]:
    """The entries of a captions file. A last line without its newline (a run cut off while writing) is
    ignored, and with ``repair`` cut from the file; any other unreadable line raises ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    entries, good_end = [], 0
    lines = data.split(b"\n")
    for number, line in enumerate(lines, 1):
        is_last = number == len(lines)
        if not line.strip():
            if not is_last:
                good_end += len(line) + 1
            continue
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str):
                raise ValueError("not an object with a file_name")
        except ValueError as exc:
            if is_last:  # cut off mid-write
                break
            raise ValueError(f"{path}:{number}: not a captions line ({exc})") from None
        if is_last:  # complete JSON but no newline yet: keep it, but cut the file back to it
            break
        entries.append(entry)
        good_end += len(line) + 1
    if repair and good_end < len(data):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return entries


def load_captions(path: str | Path) -> dict[str, str]:
    """{file_name: cleaned caption} of a captions file (the last entry of a file name wins; empty captions are
    left out). A missing file gives {}."""
    return {e["file_name"]: e["caption"] for e in read_captions(path) if isinstance(e.get("caption"), str) and e["caption"]}

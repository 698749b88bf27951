"""The offline CLIP tokenizer (the one Stable Diffusion 1.5 uses), built from open_clip's shipped BPE file.

Nothing can be downloaded here, but open_clip ships OpenAI's BPE merge list (`bpe_simple_vocab_16e6.txt.gz`).
The Hugging Face CLIP vocabulary is a pure function of that list, built exactly as open_clip's
`SimpleTokenizer` builds its encoder:

    256 byte characters (GPT-2's bytes_to_unicode order), the same 256 with '</w>' appended,
    the first 49152 - 256 - 2 = 48894 merges joined, then '<|startoftext|>' (49406) and '<|endoftext|>' (49407).

`merges.txt` holds those 48894 merge lines under a '#version: 0.2' header. The two files are written once,
atomically, into `cache_dir()/clip_tokenizer` and loaded with `transformers.CLIPTokenizer.from_pretrained`
(transformers 5's constructor silently ignores file arguments, so we always go through a folder).

Conventions: sequences are 77 tokens, position 0 is the start token, padding is '<|endoftext|>' (as SD 1.5).
"""
from __future__ import annotations

import gzip
import importlib.util
import json
from functools import lru_cache
from pathlib import Path

from hands.paths import cache_dir, write_atomic

CLIP_MAX_LENGTH = 77
START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
NUM_MERGES = 49152 - 256 - 2  # open_clip's SimpleTokenizer: merges[1 : 49152 - 256 - 2 + 1]
_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


def open_clip_bpe_path() -> Path:
    """Path of open_clip's shipped `bpe_simple_vocab_16e6.txt.gz`, found without importing open_clip
    (its import sets an environment variable and loads torch models' code)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("open_clip is not installed: `pip install open-clip-torch` "
                                "(it ships the CLIP BPE file)")
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"open_clip's BPE vocabulary is missing: {path}")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP's reversible byte -> printable-character table; the vocabulary's first 256 entries in this order.
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def clip_vocab_and_merges(bpe_path: str | Path | None = None) -> tuple[dict[str, int], list[str]]:
    """The HF CLIP vocabulary (token -> id, 49408 entries) and merge lines (48894), from open_clip's BPE file."""
    lines = gzip.open(bpe_path or open_clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = lines[1 : NUM_MERGES + 1]  # line 0 is the file's own version header
    if len(merges) != NUM_MERGES:
        raise ValueError(f"{bpe_path}: expected at least {NUM_MERGES} merge lines, found {len(merges)}")
    tokens = list(_bytes_to_unicode().values())
    tokens = tokens + [t + "</w>" for t in tokens]
    tokens += ["".join(m.split()) for m in merges]
    tokens += [START_TOKEN, END_TOKEN]
    return {t: i for i, t in enumerate(tokens)}, merges


def _atomic_write(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_clip_tokenizer_files(folder: str | Path, bpe_path: str | Path | None = None) -> Path:
    """Write vocab.json, merges.txt and the tokenizer configs into `folder` (each file atomically). Returns folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges(bpe_path)
    special = {"bos_token": START_TOKEN, "eos_token": END_TOKEN, "unk_token": END_TOKEN, "pad_token": END_TOKEN}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": CLIP_MAX_LENGTH, "do_lower_case": True, **special}
    # merges.txt and the configs first, vocab.json last: its presence marks a complete folder.
    _atomic_write(folder / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
    _atomic_write(folder / "tokenizer_config.json", json.dumps(config, indent=2))
    _atomic_write(folder / "special_tokens_map.json", json.dumps(special, indent=2))
    _atomic_write(folder / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    return folder


def clip_tokenizer_folder() -> Path:
    """`cache_dir()/clip_tokenizer`, written on first use."""
    folder = cache_dir() / "clip_tokenizer"
    if not all((folder / name).is_file() for name in _FILES):
        write_clip_tokenizer_files(folder)
    return folder


@lru_cache(maxsize=4)
def _load(folder: str):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(folder, local_files_only=True)


def load_clip_tokenizer(folder: str | Path | None = None):
    """The CLIP tokenizer of SD 1.5 (`transformers.CLIPTokenizer`, 77 tokens, padding with '<|endoftext|>').

    folder: a tokenizer folder (vocab.json, merges.txt), e.g. an SD folder's `tokenizer/`; default: the offline
    one built from open_clip's BPE file in the project cache. The loaded tokenizer is cached per folder.
    """
    return _load(str(Path(folder) if folder is not None else clip_tokenizer_folder()))

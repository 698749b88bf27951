"""``python -m generator.caption``: hand-related captions for a dataset's images from a local vision-language model.

    python -m generator.caption --dataset coco --root /data/coco --model /models/Qwen2-VL-7B-Instruct
    python -m generator.caption --dataset coco --root /data/coco --split val --model /models/Qwen2.5-VL-7B-Instruct

AttentionHand (supplementary, "Captioning with Hand-related Text Prompt") captions MSCOCO with Qwen-VL asked
"Describe what a person is doing with his or her hands in the image." (:data:`QUESTION`). Here any local
image-text-to-text model that transformers loads with ``AutoModelForImageTextToText`` and ``AutoProcessor``
(Qwen2-VL, Qwen2.5-VL, LLaVA and alike; the original Qwen-VL needs its remote code and is not supported) answers
that question for every image of the reader's records, greedily, ``--batch-size`` images at a time.

Output: one JSON-lines file (default ``<root>/annotations/attentionhand_captions_<split>.jsonl``, the file the
``coco`` reader looks for), one line per image: ``{"image_id", "file_name", "raw", "caption"}``. ``raw`` is
the model's answer, ``caption`` the hand-related sentences of it (:func:`clean_caption`; may be empty). The run
is resumable: images already in the file are skipped, each batch is appended and flushed to disk, and a line
cut off by an interruption is dropped on the next start. The ``coco`` reader puts ``caption`` into
``meta["prompt"]``, which ``generator.train`` uses as the sample's text; images with an empty caption fall back
to the trainer's default prompt (and generation in ``mixing`` keeps its prompt banks).

Cleaning rule (:func:`clean_caption`): SesaHand observes that raw VLM captions carry scene detail unrelated to
the hands. The answer is split into sentences (at ., ! or ? followed by white space); a sentence is kept when it
names a hand part (hand, finger, thumb, palm, fist, wrist, knuckle, in singular or plural) or a hand action
(:data:`HAND_ACTIONS`: hold, grasp, grip, carry, touch, point, wave, clap, throw, catch, type, write, play,
cut, pour, pick, raise, reach, gesture, in any of their -s / -ing / -ed forms); a leading "In the
image," / "In this image," / "The image shows" is removed; at most ``max_sentences`` (3) sentences are kept.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from hands.datasets.captions import default_captions_path, load_captions, read_captions

__all__ = [
    "QUESTION",
    "HAND_PARTS",
    "HAND_ACTIONS",
    "CaptionItem",
    "clean_caption",
    "default_captions_path",
    "read_captions",
    "load_captions",
    "dataset_items",
    "Captioner",
    "caption_items",
    "main",
]

logger = logging.getLogger(__name__)

QUESTION = "Describe what a person is doing with his or her hands in the image."
HAND_PARTS = ("hand", "finger", "thumb", "palm", "fist", "wrist", "knuckle")
HAND_ACTIONS = (
    "hold", "grasp", "grip", "carry", "touch", "point", "wave", "clap", "throw", "catch", "type", "write",
    "play", "cut", "pour", "pick", "raise", "reach", "gesture",
)
_PARTS = re.compile(r"\b(" + "|".join(HAND_PARTS) + r")s?\b", re.IGNORECASE)
# verb forms: hold holds holding held; grasp(s|ing|ed); type typing typed; write writing wrote written; ...
_IRREGULAR = ("held", "caught", "threw", "thrown", "wrote", "written", "cutting", "carries", "carried", "clapping",
              "clapped", "gripping", "gripped")
_ACTIONS = re.compile(
    r"\b(" + "|".join(a.rstrip("e") for a in HAND_ACTIONS) + r")e?(s|es|ing|ed|d)?\b|\b(" + "|".join(_IRREGULAR) + r")\b",
    re.IGNORECASE,
)
_SENTENCES = re.compile(r"(?<=[.!?])\s+")
_PREFIX = re.compile(r"^(in (the|this) (image|picture|photo),?\s*|the (image|picture|photo) shows\s+)", re.IGNORECASE)


def is_hand_related(sentence: str) -> bool:
    """True when the sentence names a hand part or a hand action (see the module docstring)."""
    return bool(_PARTS.search(sentence) or _ACTIONS.search(sentence))


def clean_caption(text: str, max_sentences: int = 3) -> str:
    """The hand-related sentences of a VLM answer (the module's rule); "" when none is."""
    text = " ".join(str(text).split())
    kept = []
    for sentence in _SENTENCES.split(text):
        sentence = sentence.strip()
        if not sentence or not is_hand_related(sentence):
            continue
        stripped = _PREFIX.sub("", sentence)
        if stripped and stripped != sentence:
            stripped = stripped[0].upper() + stripped[1:]
        kept.append(stripped or sentence)
        if len(kept) == max_sentences:
            break
    return " ".join(kept)


# -- which images --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CaptionItem:
    """One image to caption: its id, its file name within the split (the key in the captions file), its path."""

    image_id: int
    file_name: str
    path: Path


def dataset_items(dataset: str, root: str | Path, split: str, *, one_person: bool = False) -> list[CaptionItem]:
    """The distinct images of a reader's records, in record order (``dataset``: "coco")."""
    if dataset != "coco":
        raise ValueError(f"--dataset {dataset}: captioning reads the coco reader's images only")
    from hands.datasets import build_dataset

    reader = build_dataset("coco", root, split, one_person=one_person)
    items, seen = [], set()
    for record in reader.records:
        if record["path"] in seen:
            continue
        seen.add(record["path"])
        items.append(CaptionItem(int(record["image_id"]), record["path"], reader.image_dir / record["path"]))
    return items


# -- the model -----------------------------------------------------------------------------------------------------
class Captioner:
    """A local image-text-to-text model answering :data:`QUESTION` (greedy decoding, batched).

    Args:
        model_path: a folder with the model and its processor (``save_pretrained`` layout); nothing is downloaded.
        device: torch device; dtype: "float32" | "float16" | "bfloat16" | "auto" (the checkpoint's).
        max_new_tokens: answer length cap. question: the prompt (default the paper's).
    """

    def __init__(self, model_path: str | Path, *, device: str = "cpu", dtype: str = "auto", max_new_tokens: int = 64,
                 question: str = QUESTION):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        path = Path(model_path).expanduser()
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ValueError(f"--model {model_path}: expected a local model folder holding config.json (nothing is downloaded)")
        try:
            self.processor = AutoProcessor.from_pretrained(path, local_files_only=True)
            torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
            self.model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True, dtype=torch_dtype)
        except (OSError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"--model {model_path}: not a transformers image-text-to-text model with its processor ({first})") from None
        self.model.to(device).eval()
        self.device = torch.device(device)
        self.max_new_tokens = int(max_new_tokens)
        self.question = question
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.padding_side = "left"  # batched generation continues every row from its last token
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        self.prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def __call__(self, images: Sequence) -> list[str]:
        """PIL images -> the model's answers (special tokens removed, stripped)."""
        import torch

        inputs = self.processor(text=[self.prompt] * len(images), images=list(images), padding=True, return_tensors="pt")
        inputs = inputs.to(device=self.device, dtype=self.model.dtype)  # casts the floating inputs (pixels) only
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        new_tokens = out[:, inputs["input_ids"].shape[1]:]
        return [text.strip() for text in self.processor.batch_decode(new_tokens, skip_special_tokens=True)]


def _load_rgb(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def caption_items(captioner, items: Sequence[CaptionItem], out: str | Path, *, batch_size: int = 8,
                  max_sentences: int = 3, progress: bool = True) -> dict:
    """Caption the ``items`` not yet in ``out`` (appended per batch, flushed and fsynced). ``captioner``: a
    callable PIL images -> answers (:class:`Captioner`). Returns counts: done_before, captioned, empty (no
    hand-related sentence), unreadable (image did not decode; counted, not written, retried next run)."""
    from tqdm import tqdm

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {entry["file_name"] for entry in read_captions(out, repair=True)}
    todo = [item for item in items if item.file_name not in done]
    stats = {"done_before": len(items) - len(todo), "captioned": 0, "empty": 0, "unreadable": 0}
    bar = tqdm(total=len(todo), desc="captions", unit="img", disable=not progress)
    with open(out, "a", encoding="utf-8") as f:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            loaded = [(item, _load_rgb(item.path)) for item in batch]
            readable = [(item, image) for item, image in loaded if image is not None]
            stats["unreadable"] += len(loaded) - len(readable)
            answers = captioner([image for _, image in readable]) if readable else []
            for (item, _), raw in zip(readable, answers):
                caption = clean_caption(raw, max_sentences)
                stats["captioned"] += 1
                stats["empty"] += not caption
                line = {"image_id": item.image_id, "file_name": item.file_name, "raw": raw, "caption": caption}
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(batch))
    bar.close()
    if stats["unreadable"]:
        logger.warning("generator.caption: %d image(s) did not decode and were not captioned", stats["unreadable"])
    return stats


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m generator.caption", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="coco", choices=("coco",), help="reader whose images are captioned")
    parser.add_argument("--root", required=True, help="the dataset folder (InterWild's data/MSCOCO layout)")
    parser.add_argument("--split", default="train", help="train (generator training) or val (Table 1 prompts)")
    parser.add_argument("--model", required=True, help="local image-text-to-text model folder (e.g. Qwen2-VL-7B-Instruct)")
    parser.add_argument("--out", help="captions file (default: <root>/annotations/attentionhand_captions_<split>.jsonl)")
    parser.add_argument("--one-person", action="store_true", help="only images with one person (the paper's generator data)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-sentences", type=int, default=3, help="hand-related sentences kept per caption")
    parser.add_argument("--limit", type=int, help="caption at most the first N images (a trial run)")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"))
    parser.add_argument("--question", default=QUESTION, help="the question asked (default: the paper's)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    for flag in ("batch_size", "max_new_tokens", "max_sentences", "limit"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} {value}: expected a positive integer")
    from hands.datasets import DatasetError

    try:
        items = dataset_items(args.dataset, args.root, args.split, one_person=args.one_person)
        if args.limit is not None:
            items = items[: args.limit]
        out = Path(args.out) if args.out else default_captions_path(args.root, args.split)
        read_captions(out)  # a broken captions file fails before the model loads
        captioner = Captioner(args.model, device=args.device, dtype=args.dtype, max_new_tokens=args.max_new_tokens,
                              question=args.question)
        stats = caption_items(captioner, items, out, batch_size=args.batch_size, max_sentences=args.max_sentences,
                              progress=not args.no_progress)
    except (DatasetError, ValueError) as error:
        print(f"generator.caption: error: {error}", file=sys.stderr)
        return 1
    print(
        f"generator.caption: {out}: {stats['captioned']} image(s) captioned now, {stats['done_before']} before, "
        f"{stats['empty']} without a hand-related sentence (they fall back to the default prompt), "
        f"{stats['unreadable']} unreadable"
    )
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())

"""``python -m hands.datasets.check``: check a dataset folder before training.

    python -m hands.datasets.check --name ih26m --root /data/InterHand2.6M
    python -m hands.datasets.check --name synthlab --root /data/synthlab --splits test-wild --max-images 200

For each split of the dataset (``--splits``, default: every split the dataset knows) the reader of
:mod:`hands.datasets` is built exactly as training builds it, so what it requires (files, folders, JSON
structure) is what is checked; then every record's image is looked for and decoded (``--max-images`` checks
the first N per split). The report lists:

- the split's status: ``ok``, ``absent`` (its folder does not exist: fine for a split that was not asked
  for), or ``ERROR`` with the reader's one-line message naming the missing or broken path;
- annotation variants found (IH2.6M: the 5 / 30 fps folders, the v1.0 ``annotations/{split}`` layout or the
  v0.0 ``annotations/{all,human_annot,machine_annot}`` one, and whether the human-annotated id list makes
  the H subset available next to H+M; ReInterHand: Mugsy / egocentric cameras);
- counts: records indexed, records the reader skips (by reason), images missing, images that do not decode,
  images whose decoded size differs from the annotation's.

Exit status: 0 when every asked split is usable; 1 when something required is missing (a reader error, an
asked split absent, no split at all, or a split without records); with ``--strict`` also when an image is
missing or does not decode (readers otherwise skip those at training time, counted). Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from PIL import Image, UnidentifiedImageError

from hands.datasets import DATASETS, DatasetError, build_dataset

__all__ = ["SPLITS", "SplitReport", "check_split", "check_dataset", "describe_variants", "main"]

SPLITS = {
    "ih26m": ("train", "val", "test"),
    "reih": ("train", "test"),
    "hic": ("test",),
    "coco": ("train", "val"),
    "synthlab": ("train-lab", "test-lab", "train-wild", "test-wild"),
}
_IH26M_V0 = ("all", "human_annot", "machine_annot")


@dataclass
class SplitReport:
    """What :func:`check_split` found for one split."""

    split: str
    status: str  # "ok" | "absent" | "error"
    message: str = ""
    records: int = 0
    skipped: Counter = field(default_factory=Counter)
    images_checked: int = 0
    images_missing: list = field(default_factory=list)
    images_undecodable: list = field(default_factory=list)
    images_wrong_size: list = field(default_factory=list)


def describe_variants(name: str, root: Path) -> dict:
    """The annotation variants present under ``root`` (file checks only, nothing parsed)."""
    root = Path(root)
    if name in ("ih26m", "synthlab"):
        from hands.datasets.ih26m import VARIANT_FOLDERS

        found = {fps: folder for fps, folder in VARIANT_FOLDERS.items() if (root / folder / "annotations").is_dir()}
        bases = [root / folder for folder in found.values()] or [root]
        info: dict = {"fps": sorted(found) or None}
        layouts, human = set(), {}
        for base in bases:
            annotations = base / "annotations"
            if any((annotations / v).is_dir() for v in _IH26M_V0):
                layouts.add("v0.0 annotations/{all,human_annot,machine_annot}")
            if any(annotations.glob("*/InterHand2.6M_*_data.json")):
                layouts.add("v1.0 annotations/{split}")
            for split in SPLITS[name]:
                names = [base / f"aid_human_annot_{split}.txt", annotations / f"aid_human_annot_{split}.txt",
                         annotations / split / f"aid_human_annot_{split}.txt"]
                if (annotations / split).is_dir():
                    human[split] = "H and H+M" if any(p.is_file() for p in names) else "H+M only (no aid_human_annot list)"
        info["layout"] = sorted(layouts) or None
        info["subsets"] = human
        return info
    if name == "reih":
        captures = [p for p in root.iterdir() if p.is_dir() and (p / "orig_fits").is_dir()] if root.is_dir() else []
        if not captures and (root / "data").is_dir():
            captures = [p for p in (root / "data").iterdir() if p.is_dir() and (p / "orig_fits").is_dir()]
        return {
            "captures": len(captures),
            "cameras": sorted({kind for c in captures for kind, sub in (("mugsy", "Mugsy_cameras"), ("ego", "Ego_cameras")) if (c / sub).is_dir()}),
        }
    if name == "coco":
        from hands.datasets.coco import ANNOTATION_FILES, MANO_FILE

        annotations = root / "annotations"
        return {
            "annotations": sorted(split for split, f in ANNOTATION_FILES.items() if (annotations / f).is_file()) or None,
            "MANO fits": MANO_FILE if (annotations / MANO_FILE).is_file() else "absent (train needs it)",
        }
    if name == "hic":
        return {"annotation": "HIC.json" if (root / "HIC.json").is_file() or (root / "data" / "HIC.json").is_file() else None}
    return {}


def _image_path(dataset, record) -> Path:
    """The image file of a reader's record (each reader keeps it in its own way)."""
    if hasattr(dataset, "image_dir"):  # ih26m, synthlab
        return Path(dataset.image_dir) / record["path"]
    if dataset.name == "hic":  # relative to the folder of HIC.json
        return Path(dataset.root) / record["path"]
    return Path(record["path"])  # reih keeps the path it found


def _split_absent(name: str, root: Path, split: str) -> bool:
    """True when nothing of ``split`` exists (so a reader error would only say 'absent')."""
    if name in ("ih26m", "synthlab"):
        from hands.datasets.ih26m import VARIANT_FOLDERS

        bases = [root] + [root / folder for folder in VARIANT_FOLDERS.values()]
        return not any((base / "annotations" / split).exists() for base in bases)
    if name == "coco":
        from hands.datasets.coco import ANNOTATION_FILES

        return not (root / "annotations" / ANNOTATION_FILES[split]).exists()
    return False


def check_split(name: str, root: Path, split: str, *, max_images: Optional[int] = None, **options) -> SplitReport:
    """Build the reader of (name, root, split) and check its records' images."""
    root = Path(root)
    if _split_absent(name, root, split):
        what = f"annotations/coco_wholebody_{split}_v1.0.json" if name == "coco" else f"annotations/{split} folder"
        return SplitReport(split, "absent", f"no {what}")
    try:
        dataset = build_dataset(name, root, split, **options)
    except (DatasetError, ValueError) as error:
        return SplitReport(split, "error", str(error))
    report = SplitReport(split, "ok", records=len(dataset.records), skipped=Counter(dataset.skipped))
    seen = set()
    for record in dataset.records:
        if max_images is not None and report.images_checked >= max_images:
            break
        path = _image_path(dataset, record)
        if path in seen:
            continue
        seen.add(path)
        report.images_checked += 1
        if not path.is_file():
            report.images_missing.append(str(path))
            continue
        try:
            with Image.open(path) as image:
                image.load()  # a full decode: truncated files fail here, not at the header
                size = (image.height, image.width)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError):
            report.images_undecodable.append(str(path))
            continue
        expected = record.get("size") if isinstance(record, dict) else None
        if expected is not None and tuple(expected) != size:
            report.images_wrong_size.append(str(path))
    if report.records == 0:
        report.status, report.message = "error", "no usable record (every record was skipped)"
    return report


def check_dataset(
    name: str, root: str | Path, splits: Optional[Sequence[str]] = None, *, max_images: Optional[int] = None, **options
) -> tuple[list[SplitReport], dict]:
    """(one report per split, the variants found). ``splits`` None: every split of the dataset."""
    if name not in DATASETS:
        raise ValueError(f"--name {name}: unknown dataset; known: {', '.join(sorted(DATASETS))}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"{root}: expected the {name} dataset folder, found {'a file' if root.exists() else 'nothing'}")
    reports = [check_split(name, root, split, max_images=max_images, **options) for split in (splits or SPLITS[name])]
    return reports, describe_variants(name, root)


def _format(name: str, root: Path, reports: list[SplitReport], variants: dict) -> list[str]:
    lines = [f"{name} at {root}"]
    if variants:
        lines.append("variants: " + ", ".join(f"{k} {v}" for k, v in variants.items()))
    for r in reports:
        if r.status != "ok":
            lines.append(f"  {r.split}: {r.status.upper()} {r.message}")
            continue
        skipped = sum(r.skipped.values())
        lines.append(
            f"  {r.split}: ok, {r.records} records, {skipped} skipped by the reader, {r.images_checked} images checked: "
            f"{len(r.images_missing)} missing, {len(r.images_undecodable)} do not decode, {len(r.images_wrong_size)} of another size"
        )
        for reason, count in sorted(r.skipped.items()):
            lines.append(f"      skipped: {reason}: {count}")
        for label, paths in (("missing", r.images_missing), ("does not decode", r.images_undecodable),
                             ("size differs from the annotation", r.images_wrong_size)):
            for path in paths[:5]:
                lines.append(f"      {label}: {path}")
            if len(paths) > 5:
                lines.append(f"      ... and {len(paths) - 5} more {label}")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hands.datasets.check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True, choices=sorted(SPLITS))
    parser.add_argument("--root", required=True, type=Path, help="the dataset's folder")
    parser.add_argument("--splits", help="comma-separated splits (default: all of the dataset's)")
    parser.add_argument("--variant", help="IH2.6M: 5fps | 30fps | a sub-folder (default: the one found)")
    parser.add_argument("--cameras", choices=("mugsy", "ego"), help="ReInterHand: third-person (default) or egocentric views")
    parser.add_argument("--one-person", action="store_true", help="MSCOCO: only images with one person (the paper's generator data)")
    parser.add_argument("--require-fit", action="store_true", help="MSCOCO: only annotations with a MANO fit (the generator's data)")
    parser.add_argument("--max-images", type=int, help="decode at most this many images per split")
    parser.add_argument("--strict", action="store_true", help="also fail on missing or undecodable images")
    args = parser.parse_args(argv)
    splits = [s for s in args.splits.split(",") if s] if args.splits else None
    options = {"variant": args.variant} if args.variant and args.name == "ih26m" else {}
    if args.cameras and args.name == "reih":
        options["cameras"] = args.cameras
    if args.one_person and args.name == "coco":
        options["one_person"] = True
    if args.require_fit and args.name == "coco":
        options["require_fit"] = True
    try:
        reports, variants = check_dataset(args.name, args.root, splits, max_images=args.max_images, **options)
    except (DatasetError, ValueError) as error:
        print(f"hands.datasets.check: error: {error}", file=sys.stderr)
        return 1
    for line in _format(args.name, args.root, reports, variants):
        print(line)
    failed = [r for r in reports if r.status == "error" or (splits and r.status == "absent")]
    if not any(r.status == "ok" for r in reports):
        print("hands.datasets.check: error: no usable split", file=sys.stderr)
        return 1
    if args.strict:
        failed += [r for r in reports if r.images_missing or r.images_undecodable]
    if failed:
        print(f"hands.datasets.check: FAILED: {', '.join(sorted({r.split for r in failed}))}", file=sys.stderr)
        return 1
    print("hands.datasets.check: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Checkpoint cards: the provenance recorded in every checkpoint's JSON sidecar, under the key ``card``.

    card = {
      "datasets": {"train": ["synthlab:train-lab"], "test": [...], "root": str | None,
                   "variants": {name: {...}}},                # IH2.6M fps folders / H or H+M subset, ...
      "mix": {"synthetic_ratio": r, "mode": "online" | "sync" | "offline", "labels": ..., "size": px,
              "synthetic_batch": "share" | "add", "real_per_batch": n, "generated_per_batch": m},  # one process's
      "generator": None (r = 0 or round(r * B) = 0) | {"name", "config" (the resolved generator config), "weights": {file: sha256}},
      "start_weights": {"path": str, "weights": {file: sha256}},  # only with train.backbone_weights (--backbone-weights)
      "hand_model": {"kind": "procedural" | "official", "fingerprint": sha256, "mano_dir": str | None},
      "code": {"package": "attentionhand-aug", "version": ..., "git_commit": str | None, "git_dirty": bool | None},
      "licences": [{"part", "name", "url", "note"}],          # what binds the weights
    }

``recon.train`` writes it with ``save_checkpoint(..., extra={..., **build_card(cfg, hand_model)})``;
:func:`hand_model_warning` is what ``recon.test`` prints when a checkpoint is evaluated with another MANO
model than the one it was trained with. Weight hashes are SHA-256 of the files' bytes, computed once per
process and file (path, size, mtime) and then cached: a Stable Diffusion folder is read once per run.
The licence texts are summaries with the official links; the linked terms are what binds.
"""
from __future__ import annotations

import functools
import hashlib
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

from hands.provenance import code_version

__all__ = ["build_card", "start_weights_card", "hand_model_card", "hand_model_warning", "code_version", "LICENCES", "file_sha256"]

# Summaries of the terms that bind weights trained on or with each part; the URLs are the official pages.
LICENCES = {
    "mano": {
        "part": "MANO hand model (official files)",
        "name": "MANO licence (non-commercial scientific research only)",
        "url": "https://mano.is.tue.mpg.de/license.html",
        "note": "weights trained with the official MANO model inherit its non-commercial terms",
    },
    "procedural": {
        "part": "procedural hand model (this project's MANO-format files)",
        "name": "Apache-2.0 (this project)",
        "url": "https://www.apache.org/licenses/LICENSE-2.0",
        "note": "no third-party hand-model terms",
    },
    "stable_diffusion": {
        "part": "Stable Diffusion 1.5 weights (generator)",
        "name": "CreativeML Open RAIL-M",
        "url": "https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5",
        "note": "use-based restrictions of the licence apply to generated images and what is trained on them",
    },
    "tiny_synthlab": {
        "part": "embedded tiny generator (generator/weights/tiny-synthlab, trained by this project on synthlab)",
        "name": "Apache-2.0 (this project)",
        "url": "https://www.apache.org/licenses/LICENSE-2.0",
        "note": "no third-party model weights",
    },
    "ih26m": {
        "part": "InterHand2.6M",
        "name": "CC BY-NC 4.0",
        "url": "https://mks0601.github.io/InterHand2.6M/",
        "note": "non-commercial",
    },
    "reih": {
        "part": "ReInterHand",
        "name": "CC BY-NC 4.0",
        "url": "https://mks0601.github.io/ReInterHand/",
        "note": "non-commercial",
    },
    "hic": {
        "part": "HIC (Tzionas et al.)",
        "name": "research use (see the dataset page)",
        "url": "https://files.is.tue.mpg.de/dtzionas/Hand-Object-Capture/",
        "note": "test set only; check the page's terms",
    },
    "synthlab": {
        "part": "synthlab (embedded benchmark, rendered by this project)",
        "name": "Apache-2.0 (this project)",
        "url": "https://www.apache.org/licenses/LICENSE-2.0",
        "note": "procedurally generated; no third-party images",
    },
}


@functools.lru_cache(maxsize=64)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """SHA-256 (hex) of a file's bytes, cached per (path, size, mtime) within the process."""
    stat = Path(path).stat()
    return _sha256_cached(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def _weights_hashes(path: Optional[str]) -> dict[str, str]:
    """{relative file: sha256} of the weight files under ``path`` (a file or a folder); {} for None."""
    if not path:
        return {}
    root = Path(path).expanduser()
    if root.is_file():
        return {root.name: file_sha256(root)}
    if not root.is_dir():
        return {}
    return {
        str(file.relative_to(root)): file_sha256(file)
        for file in sorted(root.rglob("*"))
        if file.is_file() and file.suffix in _WEIGHT_SUFFIXES
    }


def hand_model_card(hand_model) -> dict:
    """{"kind": "procedural" | "official", "fingerprint", "mano_dir"} of a :class:`hands.mano.HandModel`."""
    return {
        "kind": "procedural" if hand_model.is_procedural else "official",
        "fingerprint": hand_model.fingerprint(),
        "mano_dir": None if hand_model.is_procedural else str(getattr(hand_model, "mano_dir", None)),
    }


def _dataset_variants(names: list[str], data_root: Optional[str]) -> dict:
    """What :mod:`hands.datasets.check` finds about each named dataset's variants (file checks only)."""
    if not data_root:
        return {name: {"embedded": True} for name in names if name == "synthlab"}
    from hands.datasets.check import describe_variants
    from recon.data import dataset_root

    variants = {}
    for name in names:
        try:
            root = dataset_root(name, data_root, len(names))
        except ValueError:
            continue
        if root is not None and root.is_dir():
            variants[name] = describe_variants(name, root)
    return variants


def _batch(cfg) -> tuple[str, tuple[int, int]]:
    """(train.synthetic_batch, (real, generated) samples per batch of one process)."""
    from mixing.mixer import batch_parts

    mode = str(cfg.train.get("synthetic_batch", "share"))  # .get: configs from before the key were share
    return mode, batch_parts(int(cfg.train.batch_size), float(cfg.train.synthetic_ratio), mode)


def _generator_card(cfg) -> Optional[dict]:
    """The generator's name, resolved configuration and weight hashes; None when no image is generated
    (r = 0 or round(r * B) = 0)."""
    from omegaconf import OmegaConf

    if _batch(cfg)[1][1] == 0:
        return None  # r = 0, or round(r * B) = 0: no batch gets a generated sample
    mixing = OmegaConf.to_container(cfg.mixing, resolve=True)
    card: dict[str, Any] = {"name": mixing["generator"], "config_name": mixing["generator_config"]}
    if mixing["mode"] == "offline":  # images came from shards: their folder is the provenance
        shards = Path(mixing.get("shards") or "").expanduser()
        card["shards"] = str(shards)
        card["shard_files"] = len(list(shards.glob("shard-*.safetensors"))) if shards.is_dir() else 0
        card["shards_note"] = (
            "offline: images came from these shards; the generator fields below are this run's mixing settings, "
            "not necessarily those python -m mixing.pregenerate used"
        )
    try:
        from generator.model import load_config

        overrides = [f"{key}={mixing[key]}" for key in ("sd_path", "guidance_path") if mixing.get(key)]
        config = asdict(load_config(mixing["generator_config"], overrides))
    except (FileNotFoundError, ValueError) as error:  # recorded, not fatal: training already checked it
        config = {"error": str(error)}
    card["config"] = config
    weights = {}
    for key in ("sd_path", "guidance_path"):
        hashes = _weights_hashes(config.get(key) if isinstance(config, dict) else None)
        if hashes:
            weights[key] = hashes
    card["weights"] = weights or None
    if not weights:
        card["weights_note"] = f"randomly initialised from seed {config.get('seed') if isinstance(config, dict) else '?'}"
    return card


def start_weights_card(cfg) -> Optional[dict]:
    """The weights a run started from (``train.backbone_weights``): their path and the SHA-256 of their files
    ({} when they are no longer there, e.g. at a resumed run's later checkpoint); None when it started from
    random init. Two runs that name the same path may not have started from the same weights: the hash says."""
    path = cfg.train.backbone_weights
    return {"path": str(path), "weights": _weights_hashes(path)} if path else None


def build_card(cfg, hand_model) -> dict:
    """``{"card": {...}}`` for a run's config (recon.config's DictConfig) and its hand model; the keys of
    the module docstring. Safe to call at every checkpoint (hashes are cached)."""
    from recon.data import parse_specs

    train_specs = parse_specs(list(cfg.data.train), "train")
    test_specs = parse_specs(list(cfg.data.test), "test")
    names = sorted({spec.name for spec in (*train_specs, *test_specs)})
    generator = _generator_card(cfg)
    mode, (n_real, n_synthetic) = _batch(cfg)
    hand = hand_model_card(hand_model)
    licences = [LICENCES["procedural" if hand["kind"] == "procedural" else "mano"]]
    licences += [LICENCES[name] for name in names if name in LICENCES]
    sd_path = (generator.get("config") or {}).get("sd_path") if generator is not None else None
    if sd_path:
        from generator.model import is_project_generator

        licences.append(LICENCES["tiny_synthlab" if is_project_generator(sd_path) else "stable_diffusion"])
    card = {
        "datasets": {
            "train": [f"{s.name}:{s.split}" for s in train_specs],
            "test": [f"{s.name}:{s.split}" for s in test_specs],
            "root": cfg.data.root,
            "variants": _dataset_variants(names, cfg.data.root),
        },
        "mix": {
            "synthetic_ratio": float(cfg.train.synthetic_ratio),
            "mode": cfg.mixing.mode if generator is not None else None,
            "labels": cfg.mixing.labels if generator is not None else None,
            "size": int(cfg.mixing.size) if generator is not None else None,
            "synthetic_batch": mode,  # what train.batch_size counted (mixing.mixer.batch_parts)
            "real_per_batch": n_real,
            "generated_per_batch": n_synthetic,
        },
        "generator": generator,
        "hand_model": hand,
        "code": code_version(),
        "licences": licences,
    }
    start = start_weights_card(cfg)
    if start is not None:  # a run from random init has no such key
        card["start_weights"] = start
    return {"card": card}


def hand_model_warning(meta: dict, hand_model) -> Optional[str]:
    """A one-line warning when ``hand_model`` is not the MANO model the checkpoint (its sidecar ``meta``)
    was trained with; None when they match or the checkpoint does not say."""
    card_hand = (meta.get("card") or {}).get("hand_model") or {}
    trained = card_hand.get("fingerprint") or meta.get("hand_model")
    if trained is None or trained == hand_model.fingerprint():
        return None
    trained_kind = card_hand.get("kind") or ("procedural" if meta.get("procedural_hand") else "official")
    now = hand_model_card(hand_model)
    return (
        f"the checkpoint was trained with the {trained_kind} MANO model ({trained[:12]}...) but is evaluated with "
        f"the {now['kind']} one ({now['fingerprint'][:12]}...); meshes and metrics are not comparable "
        f"(pass --mano-dir {card_hand.get('mano_dir') or '<the training MANO folder>'} to match)"
    )

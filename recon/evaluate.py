"""Evaluate a regressor on test datasets with :class:`eval.evaluator.HandEvaluator` (shared by
``recon.train`` and ``recon.test``). Under torch.distributed each rank reads its own share of every test set
(:class:`recon.data.ShardSampler`) and the evaluator sums the statistics over ranks.

Skipped records: a test reader returns a :class:`hands.datasets.common.SkippedRecord` for a record that does
not load (never another sample in its place); the batches drop it and count it. Each dataset's results get
``records_skipped`` (records dropped when its index was built plus records that did not load), and the
optional ``skips`` argument receives ``{dataset key: Counter(reason -> count)}``. A test set of which no
sample could be evaluated is a DatasetError naming it and the commonest reason."""
from __future__ import annotations

from collections import Counter
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from eval.evaluator import HandEvaluator
from eval.report import make_table, to_markdown
from hands.datasets.common import DatasetError, SkippedRecord
from hands.sample import collate
from recon.data import DatasetSpec, ShardSampler, base_readers, describe_skips

__all__ = ["evaluate_regressor", "format_results"]

HEADLINE = ("MPVPE", "RRVE", "MRRPE")


@torch.no_grad()
def evaluate_regressor(
    model: nn.Module,
    test_sets: dict[DatasetSpec, torch.utils.data.Dataset],
    *,
    hand_model: nn.Module,
    device: torch.device,
    batch_size: int,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    skips: Optional[dict] = None,
    refine: Optional[Callable] = None,
) -> dict[str, dict[str, float]]:
    """{spec.key: evaluator results (mm; see HandEvaluator.evaluate)} for every test set.

    model: a regressor (``forward(batch) -> TwoHandOutput``), put in eval mode here and left so.
    hand_model: :class:`hands.mano.HandModel` whose joint regressors (row 0 the wrist) align the meshes.
    skips: a dict filled with ``{spec.key: Counter(reason -> records)}`` (every rank's, summed).
    refine: optional ``refine(batch, output) -> output`` applied to each batch's predictions before they are
    scored (a test-time optimisation such as IHMR-OPT; it enables gradients itself if it needs them).
    """
    model.eval()
    results: dict[str, dict[str, float]] = {}
    for spec, dataset in test_sets.items():
        evaluator = HandEvaluator(
            j_regressor_right=hand_model.j_regressor_for("right").to(device),
            j_regressor_left=hand_model.j_regressor_for("left").to(device),
        )
        # A regressor may offer its own paper's protocol beside these metrics (e.g. IntagHand's).
        protocol_factory = getattr(getattr(model, "module", model), "protocol_evaluator", None)
        protocol = protocol_factory() if protocol_factory is not None else None
        sampler = ShardSampler(len(dataset), num_replicas=world_size, rank=rank)
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                            collate_fn=_collate_counting)
        skipped, evaluated = Counter(), 0
        for batch, dropped in tqdm(loader, desc=f"eval {spec.key}", disable=not progress or rank != 0, leave=False):
            skipped.update(record.reason for record in dropped)
            if batch is None:
                continue
            evaluated += len(batch)
            batch = batch.to(device)
            output = model(batch)
            if refine is not None:
                output = refine(batch, output)
            evaluator.process(output, batch)
            if protocol is not None:
                protocol.process(output, batch)
        if world_size > 1:  # every rank's skips and evaluated samples
            gathered = [None] * world_size
            dist.all_gather_object(gathered, (skipped, evaluated))
            skipped, evaluated = sum((g[0] for g in gathered), Counter()), sum(g[1] for g in gathered)
        for reader in base_readers(dataset):
            skipped.update(getattr(reader, "index_skipped", None) or {})
        if evaluated == 0:
            why = f"every record was skipped: {describe_skips(skipped)}" if skipped else "the test set is empty"
            raise DatasetError(f"test dataset {spec.key}: no sample could be evaluated; {why}")
        results[spec.key] = evaluator.evaluate()
        if protocol is not None:
            results[spec.key].update(protocol.evaluate())
        results[spec.key]["records_skipped"] = int(sum(skipped.values()))
        if skips is not None:
            skips[spec.key] = skipped
    return results


def _collate_counting(items: list) -> tuple[Optional[object], list[SkippedRecord]]:
    """(batch of the loaded samples or None, the SkippedRecords among ``items``)."""
    dropped = [item for item in items if isinstance(item, SkippedRecord)]
    samples = [item for item in items if not isinstance(item, SkippedRecord)]
    return (collate(samples) if samples else None), dropped


def format_results(results: dict[str, dict[str, float]], *, run: str = "this run", compare: Optional[dict] = None,
                   compare_name: str = "compared") -> str:
    """A Table-2-style Markdown table (eval.report) of one run's results ({dataset: {metric: mm}}); with
    ``compare`` (another run's results) that run is a row too and this run's cells carry the deltas."""
    rows = {run: results} if compare is None else {compare_name: compare, run: results}
    table = make_table(rows, metrics=HEADLINE, baselines=None if compare is None else {run: compare_name})
    return to_markdown(table)

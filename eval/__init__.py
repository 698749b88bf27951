"""Evaluation of two-hand mesh regressors and of generated hand images.

- :mod:`eval.metrics`: MPVPE, RRVE, MRRPE, MPJPE as pure torch functions (metres in, millimetres out,
  one value per sample), exactly InterWild's definitions.
- :mod:`eval.evaluator`: :class:`~eval.evaluator.HandEvaluator` (reset / process / evaluate), each
  dataset's rules of which samples count (HIC, ReIH, IH2.6M, synthlab), all / single / interacting splits,
  sums over ranks under torch.distributed.
- :mod:`eval.report`: Table-2-style tables (Markdown, CSV, JSON) with the paper's rows and differences
  between runs; figures of predicted and ground-truth meshes over the input images.
- :mod:`eval.genmetrics`: FID, KID, FID-H, KID-H, hand confidence, MSE-2D, MSE-3D of generated images.

``eval`` imports ``hands`` only; it evaluates any prediction with the fields of
:class:`eval.evaluator.TwoHandPrediction` (``recon``'s TwoHandOutput among them). Importing it loads nothing.
"""

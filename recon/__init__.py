"""recon: two-hand mesh regressors and their training and test commands.

- :mod:`recon.registry`: ``REGRESSORS``, ``build_regressor``, ``--plugin`` imports (the contract is stated
  there); :mod:`recon.archs`: the built-in regressors (one import list).
- :mod:`recon.output`: ``TwoHandOutput``, what every regressor returns.
- :mod:`recon.config`: the run config (OmegaConf structured configs + configs/recon/*.yaml + overrides).
- :mod:`recon.data`, :mod:`recon.evaluate`, :mod:`recon.checkpoint`, :mod:`recon.losses`: the pieces the
  commands share.
- ``python -m recon.train``, ``python -m recon.test`` and ``python -m recon.table2`` (the runs of Table 2 over seeds).

Importing the package loads nothing and writes nothing.
"""

"""IHMR (Rong et al., 3DV 2021): the baseline regressor, the factorized refinement stages, the collision term
and the test-time optimisation IHMR-OPT. Importing the package registers ``ihmr``."""
from .model import IHMR  # noqa: F401  (registers "ihmr")

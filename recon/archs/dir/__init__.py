"""DIR (Ren et al., ICCV 2023), the decoupled iterative refinement regressor, as a small package:
:mod:`.modules` (building blocks), :mod:`.heads` (initial regressor, refinement stage, robust 6D),
:mod:`.losses` (DIR's loss functions) and :mod:`.model` (the registered regressor ``dir``)."""
from .model import DIR  # noqa: F401  (registers "dir")

__all__ = ["DIR"]

"""InterShape (Zhang et al., ICCV 2021) as a small package: :mod:`.heatmap` (the 2.5D heatmap stage and the
attention maps), :mod:`.refine` (MANO branches, the context-aware cascaded refinement), :mod:`.losses`,
:mod:`.protocol` (InterShape's own evaluation) and :mod:`.model` (the registered regressor ``intershape``)."""
from .model import InterShape  # noqa: F401  (registers "intershape")

__all__ = ["InterShape"]

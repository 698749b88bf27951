"""Built-in regressors. Importing this package registers them in :data:`recon.registry.REGRESSORS`;
this import list is the one place where built-in regressors are made known."""
from . import baseline  # noqa: F401  (registers "baseline")
from . import interwild  # noqa: F401  (registers "interwild")
from . import intaghand  # noqa: F401  (registers "intaghand")
from . import dir  # noqa: F401  (registers "dir")
from . import ihmr  # noqa: F401  (registers "ihmr")
from . import intershape  # noqa: F401  (registers "intershape")

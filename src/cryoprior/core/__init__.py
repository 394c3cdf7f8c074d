"""Layer 0: errors, tensor helpers, atomic file writing, seeding and progress."""

from cryoprior.core.errors import InputError
from cryoprior.core.tensors import expand_like

__all__ = ["InputError", "expand_like"]

"""Where evaluation used to live; it is the `CascadeSegLib.evaluation` package now.

This module re-exports the package's public names, so `from CascadeSegLib.evaluate import X`
and `CascadeSegLib.evaluate.X` keep working. New code imports from `CascadeSegLib.evaluation`.
"""

from .evaluation import *  # noqa: F403
from .evaluation import __all__  # noqa: F401

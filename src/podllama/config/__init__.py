"""services.toml, the declarative description of a stack (services.py), and the server programs podllama runs
(kinds.py)."""

from .services import *  # noqa: F403
from .services import __all__  # noqa: F401

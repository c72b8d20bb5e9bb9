"""Cache of the frozen visual features for prompt training (see :mod:`.store`)."""

from .store import *  # noqa: F403 - the package's public names, split into modules next
from .store import DATA_NAME, INDEX_NAME, _cacheable_inputs, _location  # noqa: F401 - used by the tests

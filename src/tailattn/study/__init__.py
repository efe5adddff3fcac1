"""The oracle study: realistic attention, every method on the same exact logits, the paper's
tables and figures (UTA paper, Sec. 4) as a markdown report with PNG figures and a JSON file.

Entry points: :func:`run_study` with a :class:`StudyConfig`, then :func:`write_report`; the
``tailattn study`` command wraps both.
"""

from .config import (
    DEFAULT_KEEPS,
    DEFAULT_METHODS,
    EXPERIMENTS,
    METHOD_SETS,
    PEER_METHODS,
    StudyConfig,
    expand_methods,
)
from .report import table1_rows, write_report
from .run import StudyResult, run_study

__all__ = [
    "DEFAULT_KEEPS",
    "DEFAULT_METHODS",
    "EXPERIMENTS",
    "METHOD_SETS",
    "PEER_METHODS",
    "StudyConfig",
    "StudyResult",
    "expand_methods",
    "run_study",
    "table1_rows",
    "write_report",
]

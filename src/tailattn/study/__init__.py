"""The oracle study: realistic attention, every method on the same exact logits, the paper's
tables and figures (seed 001, Sec. 4) as a markdown report with PNG figures and a JSON file.

Entry points: :func:`run_study` with a :class:`StudyConfig`, then :func:`write_report`; the
``tailattn study`` command wraps both.
"""

from .config import DEFAULT_KEEPS, DEFAULT_METHODS, EXPERIMENTS, StudyConfig
from .report import table1_rows, write_report
from .run import StudyResult, run_study

__all__ = [
    "DEFAULT_KEEPS",
    "DEFAULT_METHODS",
    "EXPERIMENTS",
    "StudyConfig",
    "StudyResult",
    "run_study",
    "table1_rows",
    "write_report",
]

"""The eval harness behind ``leankv eval`` and ``leankv bench``.

Data flows task -> examples -> runner (model + cache method) -> predictions -> metric -> rows -> report.
"""

from .bench import run_bench, write_bench
from .methods import MethodSpec, available_methods, make_cache, parse_method
from .report import Summary, summarize, write_report
from .runner import SETTINGS, evaluate_example, run_eval
from .tasks import TASKS, Example

__all__ = [
    "SETTINGS",
    "TASKS",
    "Example",
    "MethodSpec",
    "Summary",
    "available_methods",
    "evaluate_example",
    "make_cache",
    "parse_method",
    "run_bench",
    "run_eval",
    "summarize",
    "write_bench",
    "write_report",
]

"""Eval tasks: each turns a seed and a tokenizer into ``Example`` records and scores predictions for them."""

from .base import Example, ScoredTask, Task, encode, fit_length, truncate_middle
from .longbench import LongBenchTask
from .needle import NeedleTask
from .passkey import PasskeyTask, load_passkey_file
from .perplexity import PerplexityTask, teacher_forced
from .ruler import RulerTask

TASKS = {
    "passkey": PasskeyTask,
    "needle": NeedleTask,
    "ruler": RulerTask,
    "longbench": LongBenchTask,
    "perplexity": PerplexityTask,
}

__all__ = [
    "TASKS",
    "Example",
    "LongBenchTask",
    "NeedleTask",
    "PasskeyTask",
    "PerplexityTask",
    "RulerTask",
    "ScoredTask",
    "Task",
    "encode",
    "fit_length",
    "load_passkey_file",
    "teacher_forced",
    "truncate_middle",
]

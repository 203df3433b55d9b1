"""A lean install: the caches need torch and transformers (and what loading models needs); the eval harness's
packages live in the ``eval`` extra, are never pulled by the core install, and are never imported by
``import leankv_hf``."""

import re
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, requires

HARNESS = {"datasets", "matplotlib", "rouge-score", "rapidfuzz", "jieba", "sentencepiece", "evaluate", "fuzzywuzzy"}


def _name(requirement: str) -> str:
    return re.split(r"[ ;<>=!~\[(]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _core(requirements: list[str] | None) -> list[str]:
    return [r for r in requirements or [] if "extra ==" not in r]


def test_the_core_install_pulls_no_harness_package():
    """Every package the core install brings in, transitively (as installed here), is outside the harness."""
    seen, todo = set(), [_name(r) for r in _core(requires("leankv-hf"))]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            todo += [_name(r) for r in _core(requires(name))]
        except PackageNotFoundError:  # an optional platform dependency not installed here
            continue
    assert "torch" in seen and "transformers" in seen
    assert not seen & HARNESS, sorted(seen & HARNESS)
    extra = {_name(r) for r in requires("leankv-hf") if 'extra == "eval"' in r}
    assert {"datasets", "matplotlib", "rouge-score", "rapidfuzz", "jieba"} <= extra


def test_importing_leankv_hf_imports_no_harness_package():
    code = "import sys, leankv_hf; from leankv_hf import *; print(sorted({m.split('.')[0] for m in sys.modules}))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    modules = set(eval(loaded))
    assert "torch" in modules and not modules & {name.replace("-", "_") for name in HARNESS}

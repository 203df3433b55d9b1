"""The notebooks in notebooks/ run top to bottom at small sizes and produce what they promise.

Each notebook's cell tagged ``parameters`` is replaced by small values, and it runs in a fresh temporary
directory (nothing is written into the repository) on a kernel that is this interpreter: a kernelspec written
for the test points at ``sys.executable``, so no jupyter installation beyond the venv is needed.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
KERNEL = "leankv-test-python"
TIMEOUT_S = 300  # per cell: generous, a loaded CI machine is slow; the whole run takes well under a minute idle

QUICKSTART_PARAMETERS = """
MODEL = "smollm2-135m"
DEVICE = "cpu"
CONTEXT_REPEATS = 10
MAX_NEW_TOKENS = 8
LAYER = 15
"""
EVAL_METHODS = ["full", "hetero:k8v4", "sparse:adakv@0.2", "unified:leankv"]
BENCH_METHODS = ["hetero:k8v4", "unified:leankv"]
EVAL_PARAMETERS = f"""
MODEL = "smollm2-135m"
METHODS = "{",".join(EVAL_METHODS)}"
LENGTHS = "256"
DEPTHS = "0,1"
LIMIT = 2
BENCH_METHODS = "{",".join(BENCH_METHODS)}"
BENCH_LENGTHS = "256"
DECODE_TOKENS = 4
REPEATS = 1
OUT = "results/notebook"
"""


@pytest.fixture(scope="module")
def kernel_specs(tmp_path_factory) -> KernelSpecManager:
    """Kernelspecs holding one kernel that runs ipykernel on this very interpreter."""
    root = tmp_path_factory.mktemp("kernels")
    spec = root / KERNEL
    spec.mkdir()
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "leankv-hf tests",
                "language": "python",
            }
        )
    )
    return KernelSpecManager(kernel_dirs=[str(root)])


def load(name: str) -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOKS / name, as_version=4)


def run(
    name: str, parameters: str, workdir: Path, kernel_specs: KernelSpecManager, extra: tuple[str, ...] = ()
) -> nbformat.NotebookNode:
    """Execute notebook ``name`` in ``workdir`` with its parameters cell's source replaced and the ``extra``
    cells appended; raises on any cell's error."""
    nb = load(name)
    tagged = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{name}: expected one cell tagged 'parameters', found {len(tagged)}"
    tagged[0].source = parameters.strip()
    nb.cells += [nbformat.v4.new_code_cell(source) for source in extra]
    km = AsyncKernelManager(kernel_name=KERNEL, kernel_spec_manager=kernel_specs)
    client = NotebookClient(nb, km=km, timeout=TIMEOUT_S, resources={"metadata": {"path": str(workdir)}})
    client.execute()
    return nb


def text_of(nb: nbformat.NotebookNode) -> str:
    """All text the notebook's cells printed or displayed."""
    parts = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if output.output_type == "stream":
                parts.append(output.text)
            elif output.output_type in ("display_data", "execute_result"):
                data = output.get("data", {})
                parts.append(data.get("text/markdown", data.get("text/plain", "")))
    return "\n".join(parts)


def images_of(nb: nbformat.NotebookNode) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


@pytest.mark.parametrize("name", ["01_quickstart.ipynb", "02_eval.ipynb"])
def test_notebook_is_stored_clean(name):
    nb = load(name)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code), f"{name} holds outputs"
    install = code[0].source
    assert "%pip install" in install and 'find_spec("leankv_hf") is None' in install


@pytest.mark.slow
def test_quickstart_runs(tmp_path, kernel_specs):
    # The appended cells print the notebook's records from the kernel, for the checks below.
    readback = (
        "import json; print('ROWS=' + json.dumps(rows))",
        "print('SHAPES=' + json.dumps([list(kept.shape), list(tiers.shape)]))",
    )
    nb = run("01_quickstart.ipynb", QUICKSTART_PARAMETERS, tmp_path, kernel_specs, readback)
    out = text_of(nb)
    rows = json.loads(out.split("ROWS=", 1)[1].splitlines()[0])
    kept_shape, tiers_shape = json.loads(out.split("SHAPES=", 1)[1].splitlines()[0])

    names = [r["cache"] for r in rows]
    assert names == [
        "DynamicCache",
        "QuantizedHeteroCache K8V4",
        "QuantizedHeteroCache K4V2",
        "SparseHeadCache adakv@0.2",
        "UnifiedLeanCache",
    ]
    assert all(r["output"] for r in rows), rows
    by_name = {r["cache"]: r for r in rows}
    assert by_name["DynamicCache"]["key found"], "the uncompressed reference should find the key"
    # float32 DynamicCache: twice a 16-bit one; every leankv cache is smaller than the 16-bit reference.
    assert by_name["DynamicCache"]["compression_ratio"] == pytest.approx(0.5)
    for name in names[1:]:
        assert by_name[name]["compression_ratio"] > 1, by_name[name]
    assert by_name["QuantizedHeteroCache K4V2"]["nbytes"] < by_name["QuantizedHeteroCache K8V4"]["nbytes"]
    assert kept_shape == [30, 1, 3] and tiers_shape == [30, 1, 3, 3]
    assert "| cache | output | key found |" in out and "head 2: keeps" in out
    assert "context tokens compressed once" in out and "saved and reloaded in" in out
    answers = [line for line in out.splitlines() if line.startswith(("pass key: ", "city: ", "name: "))]
    assert len(answers) == 3 and all(line.endswith(("(found)", "(missed)")) for line in answers), answers
    assert list(tmp_path.iterdir()) == []  # the quickstart writes no files


@pytest.mark.slow
def test_eval_notebook_runs(tmp_path, kernel_specs):
    nb = run("02_eval.ipynb", EVAL_PARAMETERS, tmp_path, kernel_specs)
    out_dir = tmp_path / "results" / "notebook"

    summary = json.loads((out_dir / "passkey" / "summary.json").read_text())
    assert [e["method"] for e in summary["entries"]] == EVAL_METHODS
    assert all(e["task"] == "passkey" and e["n"] == 2 for e in summary["entries"])
    rows = (out_dir / "passkey" / "rows.jsonl").read_text().splitlines()
    assert len(rows) == 2 * len(EVAL_METHODS)
    plots = sorted(p.name for p in (out_dir / "passkey").glob("*.png"))
    assert "score_vs_ratio_passkey.png" in plots
    assert len([p for p in plots if p.startswith("passkey_heatmap_")]) == len(EVAL_METHODS)

    with (out_dir / "bench" / "bench.csv").open() as f:
        bench = list(csv.DictReader(line for line in f if not line.startswith("#")))
    assert [(r["method"], r["length"]) for r in bench] == [(m, "256") for m in ["full", *BENCH_METHODS]]
    assert (out_dir / "bench" / "bench.png").is_file()

    shown = text_of(nb)
    assert "$ leankv eval --task passkey" in shown and "$ leankv bench" in shown
    assert "| method | example | key | output | score |" in shown
    assert images_of(nb) == len(plots) + 1  # every eval plot and the bench plot are displayed

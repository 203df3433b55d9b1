"""One layer's decode step kernel alone (`kernels.cpu.DecodeStep`): microseconds per call over two stores of random
rows (K8V4 and K4V2, as `unified:leankv` keeps a prompt), smollm2-135m's shapes (3 KV heads of 64 dims, 3 query
heads each) and an exact window of 20 tokens. End-to-end decode timings on a shared VM drift by more than a kernel
change moves them; this times the kernel with nothing else around it.

    OMP_NUM_THREADS=1 taskset -c 0 python eval/step_bench.py --rows 1000
    OMP_NUM_THREADS=2 python eval/step_bench.py --rows 1000 --against <an older checkout>   # an A/B

``--against`` loads that checkout's library too and calls both kernels in turn, round after round, in one process:
the two meet the same machine, which separate processes on this VM do not (their timings drift by more than 10%
between runs). Both are compiled in this process, into a fresh numba cache: a kernel cached by another process could
link the other copy's routines of the same name.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import torch

import leankv_hf.store

DIM, HEADS, GROUPS, WINDOW = 64, 3, 3, 20


def decode_step(store: ModuleType, rows: int):
    """A call of one decode step over two stores of ``rows`` random rows per head, built with the library's ``store``
    module; the same rows whichever library."""
    torch.manual_seed(0)
    stores = []
    for key, value in [
        (store.Precision(8, DIM), store.Precision(4, DIM)),
        (store.Precision(4, DIM), store.Precision(2, DIM)),
    ]:
        ragged = store.RaggedStore(key, value)
        ragged.init(1, HEADS, torch.device("cpu"))
        segments = torch.arange(HEADS).repeat_interleave(rows)
        n = segments.numel()
        encoded = torch.randn(n, DIM).half(), torch.randn(n, DIM).half()
        ragged.add(*encoded, segments, torch.arange(n), torch.rand(n), torch.zeros(n))
        stores.append(ragged)
    fused = store.PaddedLayout(stores).decode_step(torch.float32)
    if fused is None:
        raise SystemExit("the fused CPU kernels are not available here (numba missing, or LEANKV_FUSED=0)")
    step, _ = fused
    query = torch.randn(1, HEADS, GROUPS, DIM)
    keys, values = torch.randn(2, 1, HEADS, WINDOW, DIM)
    recent, ages = torch.rand(1, HEADS, WINDOW), torch.zeros(1, HEADS, WINDOW, dtype=torch.uint8)
    return lambda: step(query, query, keys, values, None, DIM**-0.5, True, False, recent, ages)


def other_store(root: str) -> ModuleType:
    """The ``store`` module of the library in checkout ``root``, imported under another package name."""
    package = Path(root) / "leankv_hf"
    spec = importlib.util.spec_from_file_location(
        "leankv_hf_against", package / "__init__.py", submodule_search_locations=[str(package)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return importlib.import_module(f"{spec.name}.store")


def timed(call, calls: int) -> float:
    """Microseconds per call over ``calls`` calls."""
    start = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1000, help="rows per head in each of the two stores")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5, help="rounds (with --against: each times both kernels)")
    parser.add_argument("--against", help="another checkout's root: its kernel and this one's in turn, one process")
    args = parser.parse_args()
    threads = f"{torch.get_num_threads()} threads, {args.rows} rows per head in each of 2 stores"
    if args.against is None:
        call = decode_step(leankv_hf.store, args.rows)
        for _ in range(20):  # compiles (or loads) the kernel and warms the threads
            call()
        times = [timed(call, args.calls) for _ in range(args.repeats)]
        print(
            f"{threads}: {min(times):.0f} us per call (best of {args.repeats}), median {statistics.median(times):.0f}"
        )
        return
    import numba

    numba.config.CACHE_DIR = tempfile.mkdtemp(prefix="step_bench_numba_")
    calls = {
        "this": decode_step(leankv_hf.store, args.rows),
        "against": decode_step(other_store(args.against), args.rows),
    }
    outputs = {name: [call() for _ in range(20)][-1] for name, call in calls.items()}
    same = torch.equal(*outputs.values())
    times = {name: [] for name in calls}
    for r in range(args.repeats):  # the order alternates, so neither side always runs first
        for name in list(calls)[:: 1 if r % 2 == 0 else -1]:
            times[name].append(timed(calls[name], args.calls))
    ratios = [a / b for a, b in zip(times["this"], times["against"], strict=True)]
    for name, t in times.items():
        print(
            f"{name}: {threads}: {min(t):.0f} us per call (best of {args.repeats}), median {statistics.median(t):.0f}"
        )
    print(
        f"this / against, per round: median {statistics.median(ratios):.3f} (range {min(ratios):.3f}-{max(ratios):.3f});"
        f" outputs {'bitwise equal' if same else 'differ'}"
    )


if __name__ == "__main__":
    main()

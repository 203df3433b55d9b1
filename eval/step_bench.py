"""One layer's decode step kernel alone (`kernels.cpu.DecodeStep`): microseconds per call over two stores of random
rows (K8V4 and K4V2, as `unified:leankv` keeps a prompt), smollm2-135m's shapes (3 KV heads of 64 dims, 3 query
heads each) and an exact window of 20 tokens. End-to-end decode timings on a shared VM drift by more than a kernel
change moves them; this times the kernel with nothing else around it.

    OMP_NUM_THREADS=1 taskset -c 0 python eval/step_bench.py --rows 1000
    PYTHONPATH=<an older checkout> OMP_NUM_THREADS=1 taskset -c 0 python eval/step_bench.py --rows 1000   # an A/B
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from leankv_hf.store import PaddedLayout, Precision, RaggedStore

DIM, HEADS, GROUPS, WINDOW = 64, 3, 3, 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1000, help="rows per head in each of the two stores")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    stores = []
    for key, value in [(Precision(8, DIM), Precision(4, DIM)), (Precision(4, DIM), Precision(2, DIM))]:
        store = RaggedStore(key, value)
        store.init(1, HEADS, torch.device("cpu"))
        segments = torch.arange(HEADS).repeat_interleave(args.rows)
        n = segments.numel()
        rows = torch.randn(n, DIM).half(), torch.randn(n, DIM).half()
        store.add(*rows, segments, torch.arange(n), torch.rand(n), torch.zeros(n))
        stores.append(store)
    fused = PaddedLayout(stores).decode_step(torch.float32)
    if fused is None:
        raise SystemExit("the fused CPU kernels are not available here (numba missing, or LEANKV_FUSED=0)")
    step, _ = fused
    query = torch.randn(1, HEADS, GROUPS, DIM)
    keys, values = torch.randn(2, 1, HEADS, WINDOW, DIM)
    recent, ages = torch.rand(1, HEADS, WINDOW), torch.zeros(1, HEADS, WINDOW, dtype=torch.uint8)

    def call() -> None:
        step(query, query, keys, values, None, DIM**-0.5, True, False, recent, ages)

    for _ in range(20):  # compiles (or loads) the kernel and warms the threads
        call()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for _ in range(args.calls):
            call()
        times.append((time.perf_counter() - start) / args.calls * 1e6)
    print(
        f"{torch.get_num_threads()} threads, {args.rows} rows per head in each of 2 stores: "
        f"{min(times):.0f} us per call (best of {args.repeats}), median {statistics.median(times):.0f}"
    )


if __name__ == "__main__":
    main()

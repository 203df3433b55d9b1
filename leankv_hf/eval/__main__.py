"""``python -m leankv_hf.eval``: ``leankv eval``, sharded across processes when launched on several (each
writes its own rows; the main process merges and reports): ``accelerate launch --multi_gpu --num_processes N -m
leankv_hf.eval ...`` on GPUs, ``torchrun --nproc_per_node N -m leankv_hf.eval ...`` on CPU cores."""

from __future__ import annotations

import argparse
import sys

from .cli import add_eval_arguments, run_eval_command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="leankv-eval", description=__doc__)
    add_eval_arguments(parser)
    return run_eval_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

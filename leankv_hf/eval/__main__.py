"""``python -m leankv_hf.eval`` or ``accelerate launch -m leankv_hf.eval``: ``leankv eval``, sharded across
processes when launched on several (each writes its own rows; the main process merges and reports)."""

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

"""Question-agnostic PassKey beside kvpress: our rows from `leankv eval --suite eval/suites/passkey_agnostic.yaml`
(the question withheld while the cache compresses) and kvpress 0.5.5 on the same prompts in the same setting
(../shared/ANCHORS.md, "Question-agnostic"), one panel per prompt length that both measured.

    python eval/plot_agnostic_vs_peers.py   # -> eval/results/passkey_agnostic/accuracy_vs_compression.png
"""

import json
from collections import defaultdict
from pathlib import Path

from leankv_hf.eval.report import pyplot, save_png

HERE = Path(__file__).parent / "results" / "passkey_agnostic"

# {length: [(press, correct of 6, nominal ratio)]} as ANCHORS.md reports them. KVzip and AdaKV only mask tokens
# (their real compression is 1x); the others drop rows.
PEERS = {
    "2k": [
        ("KVzip", 5, 4.0),
        ("KVzip", 6, 10.0),
        ("TOVA", 6, 4.0),
        ("TOVA", 4, 10.0),
        ("KeyDiff", 3, 4.0),
        ("KeyDiff", 0, 10.0),
        ("Knorm", 2, 4.0),
        ("Knorm", 0, 10.0),
        ("SnapKV", 1, 4.0),
        ("SnapKV", 1, 10.0),
        ("ExpectedAttention", 0, 4.0),
        ("ExpectedAttention", 0, 10.0),
    ],
    "4k": [
        ("TOVA", 3, 4.0),
        ("TOVA", 1, 10.0),
        ("KeyDiff", 4, 4.0),
        ("KeyDiff", 1, 10.0),
        ("Knorm", 0, 4.0),
        ("Knorm", 0, 10.0),
        ("SnapKV", 0, 4.0),
        ("SnapKV", 0, 10.0),
        ("ExpectedAttention", 0, 4.0),
        ("ExpectedAttention", 0, 10.0),
    ],
}


def ours(length: str) -> dict[str, tuple[float, float]]:
    """Per method at ``length``: (correct prompts, real compression: dense bytes over stored bytes, summed)."""
    correct, dense, stored = defaultdict(float), defaultdict(int), defaultdict(int)
    for line in (HERE / "rows.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["metadata"]["length"] == length:
            correct[row["method"]] += row["score"]
            dense[row["method"]] += row["dense_bytes"]
            stored[row["method"]] += row["cache_bytes"]
    return {m: (correct[m], dense[m] / stored[m]) for m in correct}


def main() -> None:
    plt = pyplot()
    figure, panels = plt.subplots(1, len(PEERS), figsize=(15, 5.5), sharey=True)
    for axes, (length, peers) in zip(panels, PEERS.items(), strict=True):
        for i, (method, (y, x)) in enumerate(sorted(ours(length).items())):
            axes.scatter(x, y, marker="o", s=50, zorder=3)
            axes.annotate(method, (x, y), fontsize=6, xytext=(4, 4 + 8 * (i % 3)), textcoords="offset points")
        for label, y, x in peers:
            axes.scatter(x, y, marker="x", color="grey", zorder=2)
            axes.annotate(
                f"kvpress {label}", (x, y), fontsize=6, color="grey", xytext=(4, -9), textcoords="offset points"
            )
        axes.set_xscale("log")
        axes.set_xlabel("compression vs 16-bit (ours: real stored bytes; kvpress: nominal, KVzip frees nothing)")
        axes.set_title(f"{length} prompts (6)")
        axes.set_ylim(-0.5, 6.5)
        axes.grid(alpha=0.3)
    panels[0].set_ylabel("PassKey correct, question after the compressed context")
    figure.suptitle(
        "smollm2-135m, shared PassKey set, question-agnostic: leankv (dots) vs kvpress (grey x, ANCHORS.md)"
    )
    save_png(figure, HERE / "accuracy_vs_compression.png")


if __name__ == "__main__":
    main()

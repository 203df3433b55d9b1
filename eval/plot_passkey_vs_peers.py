"""The published accuracy-vs-bytes figure: our methods on the 18 shared PassKey prompts (from the summary that
`leankv eval --suite eval/suites/passkey_peers.yaml` wrote) beside the peers measured on the same prompts
(../shared/ANCHORS.md, "Measured here, side by side").

    python eval/plot_passkey_vs_peers.py   # -> eval/results/passkey_peers/accuracy_vs_compression.png
"""

import json
from pathlib import Path

from leankv_hf.eval.report import pyplot, save_png

HERE = Path(__file__).parent / "results" / "passkey_peers"

# (label, correct of 18, compression vs 16-bit dense) as ANCHORS.md reports them. kvpress presses only mask
# tokens (nothing is freed), so their x is the nominal press ratio, not stored bytes.
PEERS = [
    ("transformers QuantizedCache quanto int4", 15, 3.2),
    ("transformers QuantizedCache quanto int2", 0, 5.3),
    ("transformers fp8 cache", 15, 2.0),
    ("kvpress TOVA", 15, 2.0),
    ("kvpress TOVA", 14, 4.0),
    ("kvpress TOVA", 7, 10.0),
    ("kvpress Knorm", 8, 4.0),
    ("kvpress Knorm", 4, 10.0),
    ("kvpress StreamingLLM", 3, 4.0),
    ("kvpress StreamingLLM", 1, 10.0),
    ("kvpress SnapKV (window 64)", 1, 4.0),
]


def main() -> None:
    entries = json.loads((HERE / "summary.json").read_text())["entries"]
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(9, 5.5))
    for i, e in enumerate(entries):
        x, y = e["dense_bytes"] / e["cache_bytes"], 18 * e["score"] / 100
        axes.scatter(x, y, marker="o", s=50, zorder=3)
        axes.annotate(e["method"], (x, y), fontsize=7, xytext=(4, 4 + 9 * (i % 3)), textcoords="offset points")
    for label, correct, ratio in PEERS:
        axes.scatter(ratio, correct, marker="x", color="grey", zorder=2)
        axes.annotate(label, (ratio, correct), fontsize=6, color="grey", xytext=(4, -10), textcoords="offset points")
    axes.set_xlabel("compression vs 16-bit dense (x; ours: real stored bytes, kvpress: nominal)")
    axes.set_ylabel("PassKey correct (of 18: 6 each at 2K / 4K / 6.5K)")
    axes.set_ylim(-1, 19)
    axes.grid(alpha=0.3)
    axes.set_title("smollm2-135m, shared PassKey set: leankv (dots) vs peers (grey x, ANCHORS.md)")
    save_png(figure, HERE / "accuracy_vs_compression.png")


if __name__ == "__main__":
    main()

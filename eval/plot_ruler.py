"""RULER 4K: each method's mean over the subtasks, as a share of the full cache's mean, against real compression, one
panel per setting; from `leankv eval --suite eval/suites/ruler_4k.yaml` (both settings). kvpress's published RULER 4K
points (../shared/ANCHORS.md) are drawn as shares of their own full cache's score: other models (Llama-3.1-8B on the
leaderboard; not named in PR #93), nominal ratios, so they compare the retention, not the scores.

    python eval/plot_ruler.py   # -> eval/results/ruler_4k/mean_vs_compression.png
"""

import json
from collections import defaultdict
from pathlib import Path

from leankv_hf.eval.report import pyplot, save_png

HERE = Path(__file__).parent / "results" / "ruler_4k"

# (press, score, its full cache's score, nominal compression) as ANCHORS.md reports them.
PEERS = [
    ("KVzip", 95.5, 95.7, 2.0),
    ("KVzip", 94.9, 95.7, 5.0),
    ("KVzip", 90.5, 95.7, 10.0),
    ("AdaKV-ExpectedAttention", 91.5, 95.5, 2.0),
    ("AdaKV-ExpectedAttention", 74.0, 95.5, 4.0),
    ("KeyDiff", 84.7, 95.5, 2.0),
    ("KeyDiff", 74.0, 95.5, 4.0),
    ("TOVA", 75.4, 95.5, 2.0),
    ("TOVA", 64.0, 95.5, 4.0),
]


def means() -> dict[str, dict[str, tuple[float, float]]]:
    """``{setting: {method: (mean score over the subtasks, real compression: dense over stored bytes, summed)}}``."""
    score, count, dense, stored = (defaultdict(float) for _ in range(4))
    for line in (HERE / "rows.jsonl").read_text().splitlines():
        row = json.loads(line)
        key = (row["setting"], row["method"])
        score[key] += row["score"]
        count[key] += 1
        dense[key] += row["dense_bytes"]
        stored[key] += row["cache_bytes"]
    out: dict[str, dict[str, tuple[float, float]]] = defaultdict(dict)
    for setting, method in score:
        key = (setting, method)
        out[setting][method] = (100 * score[key] / count[key], dense[key] / stored[key])
    return out


def main() -> None:
    plt = pyplot()
    table = means()
    figure, panels = plt.subplots(1, len(table), figsize=(7.5 * len(table), 5.5), sharey=True, squeeze=False)
    for axes, (setting, rows) in zip(panels[0], sorted(table.items()), strict=True):
        full = rows["full"][0]
        for i, (method, (mean, ratio)) in enumerate(sorted(rows.items())):
            share = 100 * mean / full
            axes.scatter(ratio, share, marker="o", s=50, zorder=3)
            axes.annotate(method, (ratio, share), fontsize=6, xytext=(4, 4 + 8 * (i % 3)), textcoords="offset points")
        for label, score, peer_full, ratio in PEERS:
            axes.scatter(ratio, 100 * score / peer_full, marker="x", color="grey", zorder=2)
            axes.annotate(
                f"kvpress {label}",
                (ratio, 100 * score / peer_full),
                fontsize=6,
                color="grey",
                xytext=(4, -9),
                textcoords="offset points",
            )
        axes.set_xscale("log")
        axes.set_xlabel("compression vs 16-bit (ours: real stored bytes; kvpress: nominal)")
        axes.set_title(f"{setting} (full cache's mean: {full:.1f})")
        axes.grid(alpha=0.3)
    panels[0][0].set_ylabel("RULER 4K mean over the subtasks, % of the full cache's")
    figure.suptitle("smollm2-135m, RULER 4K (one example per subtask): leankv (dots) vs kvpress (grey x, other models)")
    save_png(figure, HERE / "mean_vs_compression.png")


if __name__ == "__main__":
    main()

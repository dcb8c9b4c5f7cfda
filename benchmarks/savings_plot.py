"""Accuracy against measured throughput for the digits savings chain (recipes/digits-savings.yaml).

    spkprune run recipes/digits-savings.yaml
    spkprune bench digits-savings-dense digits-savings-structured@round-3 digits-savings-compacted \
        digits-savings-fewer-steps digits-savings-selected --repeats 20 --no-save --format json > bench.json
    python -m benchmarks.savings_plot bench.json --store spkprune-store --out docs/img/savings-digits.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from spkprune.store import Store  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench", type=Path, help="`spkprune bench --format json` output")
    parser.add_argument("--store", type=Path, default=Path("spkprune-store"))
    parser.add_argument("--out", type=Path, default=Path("docs/img/savings-digits.png"))
    args = parser.parse_args()
    rows = json.loads(args.bench.read_text())["rows"]
    store = Store.open(args.store, create=False)
    points = [(row["ref"], row["throughput"], store.resolve(row["ref"]).meta["metrics"]["top1"], row["timesteps"])
              for row in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    ax.plot([p[1] for p in points], [100 * p[2] for p in points], marker="o", color="tab:blue")
    for index, (ref, throughput, top1, timesteps) in enumerate(points):
        below = index % 2 == 1  # alternate above and below: neighbours at equal accuracy would overlap
        ax.annotate(f"{ref.replace('digits-savings-', '')} (T={timesteps})", (throughput, 100 * top1),
                    textcoords="offset points", xytext=(4, -12 if below else 6), fontsize=8)
    ax.set_xlabel("measured throughput (images/s, batch 32, 2 CPU cores)")
    ax.set_ylabel("test top-1 accuracy (%)")
    ax.set_title("digits savings chain: accuracy vs measured speed")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Accuracy–distance frontiers of several ``--mode=eval --guidance_scales=...`` runs on one plot and in one table.

    .venv/bin/python benchmarks/studies/frontiers.py --out docs/results/alignment_frontier.png \\
        "λ = 0=runs/demo/eval/step_000600" "λ = 0.1=runs/aligned/eval/step_000600" ...

Each argument is LABEL=DIRECTORY, the directory holding the ``metrics.json`` of an eval sweep. The table (markdown,
printed) has one row per label and guidance scale: relative conditioning accuracy, Fréchet distance and its ratio
to the train↔test floor.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="+", help="LABEL=DIRECTORY of an eval sweep's metrics.json")
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.add_argument("--title", default="")
    args = parser.parse_args()
    from diffjax.evaluation import plot_frontiers

    curves, floors = {}, []
    print("| run | guidance | relative accuracy | Fréchet distance | / floor |\n| --- | ---: | ---: | ---: | ---: |")
    for spec in args.runs:
        label, sep, directory = spec.rpartition("=")
        if not sep:
            parser.error(f"{spec!r}: expected LABEL=DIRECTORY")
        with open(os.path.join(directory, "metrics.json")) as f:
            metrics = json.load(f)
        if "frontier" not in metrics:
            parser.error(f"{directory}/metrics.json has no guidance sweep (run --mode=eval with --guidance_scales)")
        curves[label] = metrics["frontier"]
        floors.append(metrics["fd_train_floor"])
        for r in metrics["frontier"]:
            print(f"| {label} | {r['guidance_scale']:g} | {r['relative_conditioning_accuracy']:.3f} | {r['fd']:.2f} | "
                  f"{r['fd'] / metrics['fd_train_floor']:.2f} |")
    if max(floors) - min(floors) > 1e-6:
        print(f"warning: the runs' floors differ ({min(floors):.3f}..{max(floors):.3f}): other data or classifier?")
    path = plot_frontiers(curves, floors[0], args.out, args.title)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()

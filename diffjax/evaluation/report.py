"""Reports of a text-to-image evaluation's guidance sweep: the accuracy–distance frontier as a Markdown table
and, with matplotlib, a plot; also several runs' frontiers in one plot (``benchmarks/studies/frontiers.py``)."""

from __future__ import annotations

import logging
import os
from typing import Optional, Sequence


def write_frontier(frontier: Sequence[dict], floor: float, directory: str, title: str = "") -> list[str]:
    """The guidance sweep of :func:`diffjax.evaluation.text_to_image.evaluate_text2image` (its ``frontier``) as
    ``frontier.md`` (a table) and, with matplotlib, ``frontier.png`` (relative conditioning accuracy against
    Fréchet distance, one point per scale, the train↔test floor marked) in ``directory``; returns the paths
    written."""
    os.makedirs(directory, exist_ok=True)
    lines = ["| guidance scale | conditioning accuracy | relative | Fréchet distance | / floor |",
             "| ---: | ---: | ---: | ---: | ---: |"]
    for row in frontier:
        lines.append(f"| {row['guidance_scale']:g} | {row['conditioning_accuracy']:.4f} | "
                     f"{row['relative_conditioning_accuracy']:.4f} | {row['fd']:.3f} | {row['fd'] / floor:.2f} |")
    table = os.path.join(directory, "frontier.md")
    with open(table, "w") as f:
        f.write((f"{title}\n\n" if title else "") + f"train↔test floor of the Fréchet distance: {floor:.3f}\n\n"
                + "\n".join(lines) + "\n")
    plot = plot_frontiers({"": frontier}, floor, os.path.join(directory, "frontier.png"), title)
    return [table] + ([plot] if plot else [])


def plot_frontiers(curves: dict, floor: float, path: str, title: str = "") -> Optional[str]:
    """Relative conditioning accuracy against Fréchet distance, one curve per entry of ``curves`` (label → the
    rows of a guidance sweep, one point per scale), the train↔test floor marked, written as a PNG at ``path``;
    returns ``path``, or None (with a warning) without matplotlib."""
    try:  # matplotlib is optional (the ``notebooks`` extra): without it the table is written, the plot is not
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logging.warning("matplotlib is not installed: no plot at %s", path)
        return None
    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=120)
    for label, rows in curves.items():
        fd = [r["fd"] for r in rows]
        acc = [r["relative_conditioning_accuracy"] for r in rows]
        ax.plot(fd, acc, "o-", label=label or None)
        for r, x, y in zip(rows, fd, acc):
            ax.annotate(f"w={r['guidance_scale']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.axvline(floor, color="gray", linestyle="--", label=f"train↔test floor {floor:.2f}")
    ax.set_xlabel("Fréchet distance (classifier features)")
    ax.set_ylabel("relative conditioning accuracy")
    ax.set_title(title or "guidance sweep", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path

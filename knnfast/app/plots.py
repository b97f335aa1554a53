"""PNG plots of the application (``knnfast analyze --plot``, the demo's BLEU against λ);
matplotlib with the Agg backend, imported only when a plot is drawn."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple


def _axes(figsize: Tuple[float, float]):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=figsize, dpi=120)
    return plt, fig, ax


def _finish(plt, fig, ax, path, xlabel: str, ylabel: str, title: str, grid: bool = True) -> None:
    ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.set_title(title)
    if grid:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_buckets(buckets: Sequence, path: str, title: str = "") -> None:
    """Grouped bars of kNN accuracy and recall per frequency bucket
    (``knnfast.methods.analysis.Bucket``)."""
    plt, fig, ax = _axes((6, 3.6))
    x = range(len(buckets))
    ax.bar([i - 0.2 for i in x], [b.knn_accuracy for b in buckets], width=0.4, label="kNN accuracy")
    ax.bar([i + 0.2 for i in x], [b.recall for b in buckets], width=0.4, label="recall@k")
    ax.set_xticks(list(x), [f"{b.label}\n(n={b.positions})" for b in buckets])
    ax.set_ylim(0, 1)
    ax.legend()
    _finish(plt, fig, ax, path, "gold-token frequency in the datastore corpus", "", title,
            grid=False)


def plot_curve(points: Sequence[Tuple[float, float]], path: str, xlabel: str, ylabel: str,
               title: str = "", logx: bool = False) -> None:
    """One line of (x, y) points."""
    plt, fig, ax = _axes((6, 3.6))
    ax.plot([p[0] for p in points], [p[1] for p in points], "o-")
    if logx:
        ax.set_xscale("log")
    _finish(plt, fig, ax, path, xlabel, ylabel, title)


def plot_bleu_vs_lambda(points: Sequence[Tuple[float, float]], base_bleu: float, path,
                        title: str, tuned_lam: Optional[float] = None,
                        adaptive_bleu: Optional[float] = None) -> None:
    """The demo's BLEU against λ, with the base model's BLEU as a dashed line, the λ tuned
    on dev as a vertical line and adaptive kNN-MT (which has no single λ) as a dotted line."""
    plt, fig, ax = _axes((6, 4))
    ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label="kNN-MT")
    ax.axhline(base_bleu, color="gray", ls="--", label=f"base model ({base_bleu:.1f})")
    if adaptive_bleu is not None:
        ax.axhline(adaptive_bleu, color="tab:green", ls=":",
                   label=f"adaptive kNN-MT ({adaptive_bleu:.1f})")
    if tuned_lam is not None:
        ax.axvline(tuned_lam, color="tab:red", ls="-.", alpha=0.7,
                   label=f"λ tuned on dev ({tuned_lam:g})")
    ax.legend(fontsize="small")
    _finish(plt, fig, ax, path, "λ (kNN weight)", "BLEU", title)


def plot_grouped_bars(series: dict, labels: Sequence[str], path: str, xlabel: str, ylabel: str,
                      title: str = "") -> None:
    """Bars of several named series over the same categories (``labels``)."""
    plt, fig, ax = _axes((7, 3.8))
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        ax.bar([j + (i - (len(series) - 1) / 2) * width for j in range(len(labels))], values,
               width=width, label=name)
    ax.set_xticks(list(range(len(labels))), list(labels))
    ax.legend(fontsize="small")
    _finish(plt, fig, ax, path, xlabel, ylabel, title, grid=False)


def plot_lines(series: dict, path: str, xlabel: str, ylabel: str, title: str = "",
               logx: bool = False, hline: Optional[Tuple[float, str]] = None) -> None:
    """Several named lines of (x, y) points; ``hline`` = (y, label) draws a dashed reference."""
    plt, fig, ax = _axes((6, 3.8))
    for name, points in series.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=name)
    if hline is not None:
        ax.axhline(hline[0], color="gray", ls="--", label=f"{hline[1]} ({hline[0]:.2f})")
    if logx:
        ax.set_xscale("log")
    ax.legend(fontsize="small")
    _finish(plt, fig, ax, path, xlabel, ylabel, title)

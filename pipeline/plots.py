"""Training curves as PNGs (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path

from replaykd.io import atomic_path, read_jsonl


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, out: Path) -> None:
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def plot_curves(log: Path, out: Path) -> None:
    """Loss and top-1 of each head per epoch, from a run's log.jsonl."""
    plt, rows = _pyplot(), read_jsonl(log)
    epochs = [r["epoch"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key in ("loss", "loss_base", "loss_distill"):
        ax1.plot(epochs, [r[key] for r in rows], label=key)
    ax1.set_xlabel("epoch")
    ax1.set_title("training loss")
    ax1.legend()
    for head, label in (("", "top-1"), ("cls_", "cls head top-1"), ("dist_", "dist head top-1")):
        if rows and f"{head}top1" in rows[0]:
            ax2.plot(epochs, [r[f"{head}top1"] for r in rows], label=label)
    ax2.set_xlabel("epoch")
    ax2.set_title("val top-1 (%)")
    if rows and "top1" in rows[0]:
        ax2.legend()
    _save(plt, fig, out)


def plot_comparison(logs: dict, out: Path) -> None:
    """Val top-1 (the model's own prediction) per epoch of several runs on one plot; `logs` maps a label to a
    log.jsonl."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for (label, log), style in zip(logs.items(), ("-", "--", ":", "-.") * 4):
        rows = read_jsonl(log)
        ax.plot([r["epoch"] for r in rows], [r["top1"] for r in rows], style, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("val top-1 (%) (a distilled DeiT: its heads' average)")
    ax.legend()
    _save(plt, fig, out)

"""The quickstart's picture: held-out accuracy and KL(teacher || student) against step,
one line per arm, from `metrics.json`'s curves. matplotlib is optional (the `quickstart`
extra): without it `plot_curves` writes nothing and returns None."""

from __future__ import annotations

from pathlib import Path
from typing import Optional


def plot_curves(metrics: dict, path: Path) -> Optional[Path]:
    """A PNG of `metrics["arms"][name]["curve"]` at `path` (returned), or None without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # files only, whatever display the machine has
    import matplotlib.pyplot as plt

    figure, (accuracy_axes, kl_axes) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=80)
    for arm in metrics["arms"].values():
        curve = arm["curve"]
        label = arm["label"].replace("from the YAML", str(arm.get("lmbda")))
        accuracy_axes.plot(curve["step"], curve["accuracy"], marker="o", markersize=3, label=label)
        kl_axes.plot(curve["step"], curve["kl"], marker="o", markersize=3, label=label)
    accuracy_axes.axhline(metrics["teacher_accuracy"], color="gray", linestyle="--", linewidth=1, label="teacher")
    accuracy_axes.set(xlabel="step", ylabel="held-out accuracy (greedy)", ylim=(0, 1.02))
    kl_axes.set(xlabel="step", ylabel="held-out KL(teacher || student) per token", ylim=(0, None))
    accuracy_axes.legend(fontsize=7, loc="lower right")
    for axes in (accuracy_axes, kl_axes):
        axes.grid(alpha=0.3)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path)
    plt.close(figure)
    return path

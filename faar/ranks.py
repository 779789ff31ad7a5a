"""What PDRS left: every adapter's rank, a per-stage report and a heatmap (``ranks.json``, ``ranks.png``).

The report answers the paper's claim about where rank survives: task-specific and deep
layers keep more than shallow shared ones. It is computed from the model's ranks at the
moment it is asked, so it is never older than the ranks it describes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from .adapters import adapters_of
from .run import atomic_path

LINEARS = ("qkv", "proj", "fc1", "fc2")


def rank_record(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Every adapter's rank, stream ("shared" or a task) and site (``s<stage>.b<block>.<linear>``)."""
    return {n: {"rank": a.rank, "group": a.group, "site": a.site} for n, a in adapters_of(model).items()}


def site_key(site: str) -> tuple[int, int, int]:
    """Sort key of a site: stage, block, then the linears in forward order."""
    stage, block, layer = site.split(".")
    return int(stage[1:]), int(block[1:]), LINEARS.index(layer)


def rank_report(ranks: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Mean rank per stage for shared and task adapters, and whether the paper's pattern shows
    (task-specific and deep layers keep more rank than shallow shared ones)."""
    by: dict[tuple[str, int], list[int]] = {}
    for r in ranks.values():
        kind = "shared" if r["group"] == "shared" else "task"
        by.setdefault((kind, site_key(r["site"])[0]), []).append(r["rank"])
    table = {f"{kind}_stage{stage}": _mean(v) for (kind, stage), v in sorted(by.items())}
    shared = [v for (kind, _), vs in by.items() if kind == "shared" for v in vs]
    task = [v for (kind, _), vs in by.items() if kind == "task" for v in vs]
    stages = sorted({stage for _, stage in by})
    first = [v for (_, st), vs in by.items() if st == stages[0] for v in vs]
    last = [v for (_, st), vs in by.items() if st == stages[-1] for v in vs]
    return {
        "mean_rank_by_stage": table,
        "task_keeps_more_than_shared": _mean(task) > _mean(shared) if task and shared else None,
        "deep_keeps_more_than_shallow": _mean(last) > _mean(first),
    }


def report_line(report: dict[str, Any]) -> str:
    """One log line for a report."""
    return ("rank pattern: task-specific keep more than shared: {}; deepest stage keeps more than the first: {}"
            .format(report["task_keeps_more_than_shared"], report["deep_keeps_more_than_shallow"]))


def _mean(xs: list[int]) -> float:
    return sum(xs) / len(xs)


def plot_ranks(ranks: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    """Heatmap of adapter ranks: rows are layers (stage.block.linear), columns shared/tasks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    sites = sorted({r["site"] for r in ranks.values()}, key=site_key)
    groups = ["shared"] + sorted({r["group"] for r in ranks.values()} - {"shared"})
    grid = np.full((len(sites), len(groups)), np.nan)
    for r in ranks.values():
        grid[sites.index(r["site"]), groups.index(r["group"])] = r["rank"]
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(groups), 1.0 + 0.22 * len(sites)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right")
    ax.set_yticks(range(len(sites)), sites, fontsize=7)
    for (i, j), v in np.ndenumerate(grid):
        if not np.isnan(v):
            ax.text(j, i, int(v), ha="center", va="center", fontsize=6, color="w")
    fig.colorbar(im, ax=ax, label="rank")
    ax.set_title(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)

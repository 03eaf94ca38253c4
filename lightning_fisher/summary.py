"""The short summary printed at the end of a run: metrics, checkpoint, W&B run directory."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

__all__ = ["print_summary"]


def print_summary(metrics: dict[str, float], checkpoint_path: str | None, wandb_dir: str | None) -> None:
    """Print the final accuracy table and where the run's files are."""
    table = Table(title="lightning-fisher: final metrics")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name in sorted(k for k in metrics if k.startswith(("test/", "val/", "sparsity/global", "pruning/"))):
        table.add_row(name, f"{metrics[name]:.4f}")
    console = Console()
    console.print(table)
    # soft_wrap: paths stay on one line, so they can be copied
    console.print(f"checkpoint: {checkpoint_path or '(none saved)'}", soft_wrap=True)
    if wandb_dir:
        console.print(f"W&B offline run: {wandb_dir}  (upload with: wandb sync {wandb_dir})", soft_wrap=True)

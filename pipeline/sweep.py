"""Hydra multirun support: each run writes into its own folder, and a summary ranks the runs.

``python -m pipeline.train -m model=cnn,transfer train.learning_rate=1e-3,3e-4`` runs four
trainings on the same prepared data (it is read, not recomputed). Each run's model, history and
config land in ``<sweep dir>/<job number>/models/<name>/``. When the sweep ends,
:class:`SweepSummary` writes ``sweep_summary.csv``, ``sweep_summary.md`` and
``sweep_summary.png`` into the sweep folder, ranking the runs by a validation metric.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from omegaconf import DictConfig, open_dict

from pipeline.artifacts import HISTORY_NAME, SUMMARY_NAME, TrainSummary

log = logging.getLogger(__name__)


def redirect_outputs_in_multirun(cfg: DictConfig) -> DictConfig:
    """Under ``-m``, send models, reports and training state to the job's own folder."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
    except (ImportError, ValueError):  # not run through Hydra (tests, notebooks)
        return cfg
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return cfg
    job_dir = Path(hydra_cfg.runtime.output_dir)
    with open_dict(cfg):
        cfg.paths.models = str(job_dir / "models")
        cfg.paths.reports = str(job_dir / "reports")
        cfg.paths.backup = str(job_dir / "train-backup")
    log.info("multirun job %s writes into %s", hydra_cfg.job.num, job_dir)
    return cfg


def collect(sweep_dir: Path) -> pd.DataFrame:
    """One row per finished run: its overrides and its training summary."""
    rows = []
    for summary_path in sorted(sweep_dir.glob(f"*/models/*/{SUMMARY_NAME}")):
        job_dir = summary_path.parents[2]
        summary = TrainSummary.load(summary_path.parent)
        overrides_file = job_dir / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
        history = pd.read_csv(summary_path.parent / HISTORY_NAME)
        best = history.loc[history["epoch"] == summary.best_epoch].iloc[0]
        rows.append({
            "job": job_dir.name,
            "overrides": " ".join(overrides),
            "model": summary.model,
            "best_val_loss": summary.best_val_loss,
            "best_val_accuracy": float(best["val_accuracy"]),
            "best_epoch": summary.best_epoch,
            "epochs": summary.epochs,
            "wall_time_s": summary.wall_time_s,
            "pretrained": summary.pretrained,
        })
    return pd.DataFrame(rows)


def write_summary(sweep_dir: Path, metric: str = "best_val_loss") -> pd.DataFrame:
    """Rank the sweep's runs by ``metric`` (lower is better for losses) and write the summary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = collect(sweep_dir)
    if table.empty:
        log.warning("no finished runs under %s; no sweep summary written", sweep_dir)
        return table
    # Name each run by what the sweep varied; the overrides common to all runs add nothing.
    parsed = [dict(o.split("=", 1) for o in row.split() if "=" in o)
              for row in table["overrides"]]
    varied = sorted({k for p in parsed for k in p if len({q.get(k) for q in parsed}) > 1})
    table = table.rename(columns={"overrides": "all_overrides"})
    table.insert(1, "overrides", [" ".join(f"{k}={p.get(k)}" for k in varied) or "(none)"
                                  for p in parsed])
    ascending = "loss" in metric
    table = table.sort_values(metric, ascending=ascending).reset_index(drop=True)
    table.insert(0, "rank", range(1, len(table) + 1))
    table.to_csv(sweep_dir / "sweep_summary.csv", index=False)
    header = "| " + " | ".join(table.columns) + " |"
    lines = [f"# Sweep summary: runs ranked by {metric}", "", header,
             "|" + "---|" * len(table.columns)]
    for row in table.itertuples(index=False):
        lines.append("| " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v)
                                       for v in row) + " |")
    (sweep_dir / "sweep_summary.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(table) + 1.5))
    ax.barh(table["overrides"].str.replace(" ", "\n"), table[metric])
    ax.invert_yaxis()
    ax.set_xlabel(metric)
    ax.set_title(f"{len(table)} runs ranked by {metric}")
    fig.tight_layout()
    fig.savefig(sweep_dir / "sweep_summary.png", dpi=100)
    plt.close(fig)
    log.info("sweep summary of %d runs in %s; best: %s (%s = %.4f)", len(table), sweep_dir,
             table["overrides"].iloc[0], metric, table[metric].iloc[0])
    return table


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - hydra is a dependency
    Callback = object  # type: ignore[assignment,misc]


class SweepSummary(Callback):  # type: ignore[misc]
    """Hydra callback (``hydra.callbacks`` in conf/config.yaml) run when a multirun ends."""

    def __init__(self, metric: str = "best_val_loss") -> None:
        self.metric = metric

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        write_summary(Path(config.hydra.sweep.dir), self.metric)

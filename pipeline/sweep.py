"""Hydra multirun support: each run writes into its own folder, and a summary ranks the runs.

``python -m pipeline.train -m model=cnn,transfer train.learning_rate=1e-3,3e-4`` runs four
trainings on the same prepared data (it is read, not recomputed). Each run's model, history and
config land in ``<sweep dir>/<job number>/models/<name>/``. When the sweep ends,
:class:`SweepSummary` writes ``sweep_summary.csv``, ``sweep_summary.md`` and
``sweep_summary.png`` into the sweep folder, ranking the runs by a validation metric.

A job that stops on a user error ends only itself: the sweep goes on, the summary lists the job
with its error, and the command ends with status 2. A training that diverged is a losing trial,
not an error: it is listed last and the sweep's status stays 0.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from omegaconf import DictConfig, open_dict

from pipeline.artifacts import HISTORY_NAME, SUMMARY_NAME, TrainSummary
from pipeline.errors import PipelineError, TrainingDiverged
from pipeline.io import atomic_write_json, read_json

log = logging.getLogger(__name__)

FAILED_NAME = "failed.json"  # in a job's folder: why it ended without a model
SUMMARY_COLUMNS = ["job", "overrides", "model", "best_val_loss", "best_val_accuracy",
                   "best_epoch", "epochs", "wall_time_s", "pretrained", "status"]


def _multirun_job() -> Any:
    """Hydra's config of the running multirun job, or None outside a multirun."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
    except (ImportError, ValueError):  # not run through Hydra (tests, notebooks)
        return None
    return hydra_cfg if hydra_cfg.mode == RunMode.MULTIRUN else None


def redirect_outputs_in_multirun(cfg: DictConfig) -> DictConfig:
    """Under ``-m``, send models, reports and training state to the job's own folder."""
    hydra_cfg = _multirun_job()
    if hydra_cfg is None:
        return cfg
    job_dir = Path(hydra_cfg.runtime.output_dir)
    with open_dict(cfg):
        cfg.paths.models = str(job_dir / "models")
        cfg.paths.reports = str(job_dir / "reports")
        cfg.paths.backup = str(job_dir / "train-backup")
    log.info("multirun job %s writes into %s", hydra_cfg.job.num, job_dir)
    return cfg


def record_failed_job(err: PipelineError) -> bool:
    """In a multirun, log a job's error as one line and record it in the job's folder, so that
    the sweep goes on to its other jobs and the summary lists this one; False outside a
    multirun, where the error ends the process."""
    hydra_cfg = _multirun_job()
    if hydra_cfg is None:
        return False
    diverged = isinstance(err, TrainingDiverged)
    log.error("multirun job %s %s: %s", hydra_cfg.job.num,
              "diverged" if diverged else "failed", err)
    atomic_write_json(Path(hydra_cfg.runtime.output_dir) / FAILED_NAME,
                      {"error": str(err), "diverged": diverged})
    return True


def _overrides(job_dir: Path) -> list[str]:
    overrides_file = job_dir / ".hydra" / "overrides.yaml"
    return yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []


def _as_dict(overrides: list[str]) -> dict[str, str]:
    """``["model=cnn", ...]`` as ``{"model": "cnn", ...}``."""
    return dict(o.split("=", 1) for o in overrides if "=" in o)


def collect(sweep_dir: Path) -> pd.DataFrame:
    """One row per run: its overrides and its training summary, or why it has none."""
    rows = []
    for summary_path in sorted(sweep_dir.glob(f"*/models/*/{SUMMARY_NAME}")):
        job_dir = summary_path.parents[2]
        summary = TrainSummary.load(summary_path.parent)
        overrides = _overrides(job_dir)
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
            "status": "ok",
        })
    for failed_path in sorted(sweep_dir.glob(f"*/{FAILED_NAME}")):
        job_dir = failed_path.parent
        failure = read_json(failed_path, "train")
        overrides = _overrides(job_dir)
        model = _as_dict(overrides).get("model", "")
        status = "diverged" if failure["diverged"] else "failed"
        rows.append({"job": job_dir.name, "overrides": " ".join(overrides), "model": model,
                     "status": f"{status}: {failure['error']}"})
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


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
    parsed = [_as_dict(row.split()) for row in table["overrides"]]
    varied = sorted({k for p in parsed for k in p if len({q.get(k) for q in parsed}) > 1})
    table = table.rename(columns={"overrides": "all_overrides"})
    table.insert(1, "overrides", [" ".join(f"{k}={p.get(k)}" for k in varied) or "(none)"
                                  for p in parsed])
    ascending = "loss" in metric
    table = table.sort_values(metric, ascending=ascending).reset_index(drop=True)  # failed last
    finished = table["status"] == "ok"
    table.insert(0, "rank", pd.array([i + 1 if ok else None for i, ok in enumerate(finished)],
                                     dtype="Int64"))
    table.to_csv(sweep_dir / "sweep_summary.csv", index=False)
    header = "| " + " | ".join(table.columns) + " |"
    lines = [f"# Sweep summary: runs ranked by {metric}", "", header,
             "|" + "---|" * len(table.columns)]
    for row in table.itertuples(index=False):
        lines.append("| " + " | ".join("" if pd.isna(v) else f"{v:.4f}" if isinstance(v, float)
                                       else str(v) for v in row) + " |")
    (sweep_dir / "sweep_summary.md").write_text("\n".join(lines) + "\n")
    ranked = table[finished]
    if ranked.empty:
        log.warning("no run of the sweep under %s finished; sweep_summary.md says why", sweep_dir)
        return table
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(ranked) + 1.5))
    ax.barh(ranked["overrides"].str.replace(" ", "\n"), ranked[metric])
    ax.invert_yaxis()
    ax.set_xlabel(metric)
    ax.set_title(f"{len(ranked)} runs ranked by {metric}")
    fig.tight_layout()
    fig.savefig(sweep_dir / "sweep_summary.png", dpi=100)
    plt.close(fig)
    log.info("sweep summary of %d runs in %s; best: %s (%s = %.4f)", len(ranked), sweep_dir,
             ranked["overrides"].iloc[0], metric, ranked[metric].iloc[0])
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
        """Write the summary; then, if jobs failed (not merely diverged), end with status 2."""
        sweep_dir = Path(config.hydra.sweep.dir)
        table = write_summary(sweep_dir, self.metric)
        if table.empty:
            return
        diverged = table["status"].str.startswith("diverged")
        failed = table[table["status"].str.startswith("failed")]
        if diverged.any():
            log.warning("%d of %d sweep runs diverged (ranked last in %s): %s", diverged.sum(),
                        len(table), sweep_dir / "sweep_summary.md",
                        ", ".join(table.loc[diverged, "overrides"]))
        if not failed.empty:
            log.error("%d of %d sweep runs failed (see %s); first, run %s: %s", len(failed),
                      len(table), sweep_dir / "sweep_summary.md", failed["job"].iloc[0],
                      failed["status"].iloc[0].removeprefix("failed: "))
            sys.exit(2)

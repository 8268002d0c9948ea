"""evaluate.cross_checks: a labelled sample from elsewhere, scored by ROC AUC, in the card."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf


def own_test_split_as_a_catalog(cfg, folder: Path) -> Path:
    """The tiny run's test galaxies written as another survey's catalog: files and labels."""
    raw = Path(cfg.paths.raw)
    catalog = pd.read_csv(raw / "catalog.csv", dtype={"objid": str})
    predictions = pd.read_csv(Path(cfg.paths.reports) / "cnn" / "predictions.csv",
                              dtype={"objid": str})
    rows = catalog.set_index("objid").loc[predictions["objid"]]
    folder.mkdir()
    table = pd.DataFrame({"path": [str(raw / f) for f in rows["file"]],
                          "kind": ["disc" if c == "spiral" else "other" for c in rows["label"]]})
    table.to_csv(folder / "labels.csv", index=False)
    return folder / "labels.csv"


def check(catalog: Path, **changes) -> OmegaConf:
    return OmegaConf.create({"catalog": str(catalog), "image_column": "path",
                             "label_column": "kind", "positive": ["disc"], "score": ["spiral"],
                             "tta_zoom": None, "encoding": "utf-8", **changes})


@pytest.mark.slow
def test_cross_check_scores_the_sample_and_the_card_says_so(trained_tiny, tmp_path):
    from sklearn.metrics import roc_auc_score

    from pipeline import evaluate, report
    from pipeline.artifacts import Metrics, TrainedModel

    cfg, _ = trained_tiny
    catalog = own_test_split_as_a_catalog(cfg, tmp_path / "other")
    bundle = TrainedModel.load(Path(cfg.paths.models) / "cnn")
    result, rows = evaluate.cross_check(bundle, "own-test", check(catalog))

    # The test split read back from its raw cutouts: the AUC evaluate's own predictions give.
    predictions = pd.read_csv(Path(cfg.paths.reports) / "cnn" / "predictions.csv")
    expected = roc_auc_score(predictions["actual"] == "spiral", predictions["p_spiral"])
    assert result["roc_auc"] == pytest.approx(expected, abs=0.01)
    assert result["galaxies"] == len(predictions) and result["skipped"] == 0
    assert result["positives"] == int((predictions["actual"] == "spiral").sum())
    assert result["score"] == "p_spiral" and result["tta_zoom"] == bundle.inference.tta_zoom

    # Scored by the other classes' probability, the same sample ranks the other way round.
    other, _ = evaluate.cross_check(bundle, "own-test", check(catalog, score=["elliptical",
                                                                                "edge_on"]))
    assert other["roc_auc"] == pytest.approx(1 - result["roc_auc"], abs=0.01)

    # The galaxies drawn for the card: the sample's positives the model scores lowest, then
    # its other galaxies scored highest, each as the model sees it.
    spiral = predictions["actual"] == "spiral"
    (top, top_images, top_scores), (bottom, bottom_images, bottom_scores) = rows
    assert top == "labelled disc" and bottom == "not disc"
    assert len(top_images) == len(top_scores) == min(6, int(spiral.sum()))
    assert len(bottom_images) == len(bottom_scores) == min(6, int((~spiral).sum()))
    assert top_images.shape[1:] == tuple(bundle.model.input_shape[1:])
    np.testing.assert_allclose(top_scores, np.sort(predictions["p_spiral"][spiral])[:6], atol=0.02)
    np.testing.assert_allclose(bottom_scores, np.sort(predictions["p_spiral"][~spiral])[::-1][:6],
                               atol=0.02)

    reports = Path(cfg.paths.reports) / "cnn"
    metrics = Metrics.load(reports)
    metrics.cross_checks = {"own-test": result}
    metrics.save(reports)
    try:
        report.run(cfg)
        card = (Path(cfg.paths.reports) / "cards" / "cnn.md").read_text()
        assert (f"Another sample: on own-test ({len(predictions)} galaxies framed and labelled "
                "elsewhere") in card
        assert f"ROC AUC {result['roc_auc']:.3f} (test-time zoom" in card
        card_json = json.loads((Path(cfg.paths.reports) / "cards" / "cnn.json").read_text())
        assert card_json["metrics"]["other_samples"]["own-test"]["roc_auc"] == result["roc_auc"]
    finally:
        metrics.cross_checks = None
        metrics.save(reports)


@pytest.mark.slow
def test_the_card_shows_where_another_samples_labels_and_the_model_disagree(trained_tiny,
                                                                             tmp_path):
    """evaluate draws the disagreements of each cross-check; the card shows them, marked as
    cutouts, so that a released card leaves them out."""
    from pipeline import evaluate, report
    from pipeline.artifacts import CUTOUT_MARK, cross_check_figure
    from pipeline.release import without_cutouts

    cfg, _ = trained_tiny
    catalog = own_test_split_as_a_catalog(cfg, tmp_path / "other")
    own = OmegaConf.merge(cfg, {"paths": {"reports": str(tmp_path / "reports")}})
    OmegaConf.update(own, "evaluate.cross_checks", {"own-test": check(catalog)}, merge=False)
    own.models = {"cnn": cfg.models.cnn}
    metrics = evaluate.run(own, "cnn")
    assert (tmp_path / "reports" / "cnn" / "figures" / cross_check_figure("own-test")).is_file()
    report.run(own)
    card = (tmp_path / "reports" / "cards" / "cnn.md").read_text()
    assert "### Another sample: own-test" in card
    assert "disc that the model scores lowest\n(p_spiral)" in card
    assert f"ROC AUC {metrics.cross_checks['own-test']['roc_auc']:.3f}" in card
    html = (tmp_path / "reports" / "cards" / "cnn.html").read_text()
    assert html.count(CUTOUT_MARK) == 4  # examples, saliency, augmented copies, this one
    assert 'alt="Disagreements with own-test"' not in without_cutouts(html)


@pytest.mark.slow
def test_a_cross_check_that_cannot_be_scored_says_why(trained_tiny, tmp_path):
    from pipeline import evaluate
    from pipeline.artifacts import TrainedModel
    from pipeline.errors import PipelineError

    cfg, _ = trained_tiny
    catalog = own_test_split_as_a_catalog(cfg, tmp_path / "other")
    bundle = TrainedModel.load(Path(cfg.paths.models) / "cnn")
    with pytest.raises(PipelineError, match=r"evaluate.cross_checks.k.positive = \['spiral'\] "
                                            r"matches 0 of \d+ rows; a ROC AUC needs both kinds "
                                            r"\(labels there: \['disc', 'other'\]\)"):
        evaluate.cross_check(bundle, "k", check(catalog, positive=["spiral"]))
    with pytest.raises(PipelineError, match=r"no column evaluate\.cross_checks\.k\.label_column = "
                                            r"'class'"):
        evaluate.cross_check(bundle, "k", check(catalog, label_column="class"))
    with pytest.raises(PipelineError, match=r"evaluate\.cross_checks\.k\.catalog = "
                                            r"'.*nowhere\.csv': no such file"):
        evaluate.cross_check(bundle, "k", check(tmp_path / "nowhere.csv"))


def test_a_cross_check_scoring_a_class_the_model_lacks_is_refused_by_name():
    from pipeline.config import compose, validate
    from pipeline.errors import ConfigError

    cfg = compose(["experiment=gz1"])
    OmegaConf.update(cfg, "evaluate.cross_checks.gz-kaggle-2000.score", ["spirals"])
    with pytest.raises(ConfigError, match=r"'evaluate.cross_checks.gz-kaggle-2000.score' = "
                                          r"\['spirals'\] is invalid: a list of the model's "
                                          r"classes \['elliptical', 'spiral', 'edge_on'\]"):
        validate(cfg)

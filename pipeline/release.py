"""Released models: trained bundles that ship inside the package, by name and version.

    python -m pipeline.release --model-dir models/transfer --cards reports/cards \\
        --name gz1-transfer --version 1
    python -m pipeline.release --list
    python -m pipeline.predict model=gz1-transfer-v5 input=cutouts/ output=morphologies.fits

A release is a copy of a model folder as train and evaluate left it (its config, training
summary and inference settings: views, prior correction, temperature, conformal thresholds),
with the network saved again without optimizer state (a third of the size; the new file's
digest goes into its ``inference.json``), its model card (HTML and JSON) and ``release.json``
(name, version, date, where it came from, how to cite it). The packaged card leaves out its
figures of galaxy cutouts (example galaxies, saliency maps, augmented copies, cross-check
disagreements): those are SDSS and Galaxy Zoo images under their providers' terms, and the
package ships none. Releases live in
``pipeline/released/<name>-v<version>/`` and ship in the wheel. A version is never overwritten:
a new training, new data or a changed setting is a new version.
"""

from __future__ import annotations

import argparse
import datetime as dt
import html
import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

from pipeline import __version__
from pipeline.artifacts import (
    CONFIG_NAME,
    CUTOUT_MARK,
    HISTORY_NAME,
    MODEL_NAME,
    SUMMARY_NAME,
    InferenceSettings,
    TrainedModel,
    file_sha256,
)
from pipeline.errors import PipelineError
from pipeline.io import atomic_path

log = logging.getLogger(__name__)

RELEASED = Path(__file__).resolve().parent / "released"
RELEASE_NAME = "release.json"
CITATION = ("galaxy-morphology-pipeline {package} released model {release}; trained on SDSS "
            "imaging with Galaxy Zoo labels: cite SDSS and Lintott et al. 2008, 2011 (Galaxy "
            "Zoo 1) with any result made with it")

CUTOUT_NOTE = ("<em>[A figure of galaxy cutouts is left out of the packaged card: the package "
               "ships no survey images. The card that the report stage writes beside the "
               "training data shows it.]</em>")


class ReleaseError(PipelineError, ValueError):
    """A release that cannot be made or found; the message names it."""


def available() -> list[str]:
    """The names of the released models this installation carries."""
    if not RELEASED.is_dir():
        return []
    return sorted(p.name for p in RELEASED.iterdir() if (p / RELEASE_NAME).is_file())


def release_dir(name: str) -> Path:
    """The folder of released model ``name`` (for example ``gz1-transfer-v5``)."""
    folder = RELEASED / name
    if not (folder / RELEASE_NAME).is_file():
        raise ReleaseError(f"model = {name!r}: no released model of that name; this "
                           f"installation has {available()}")
    return folder


def release_table() -> str:
    """One line per released model with its card's test figures, to choose one by."""
    lines = [f"{'release':<18} {'model':<40} {'test galaxies':>13} {'accuracy':>8} "
             f"{'macro-F1':>8} {'MB':>5}"]
    for name in available():
        folder = release_dir(name)
        card = json.loads((folder / "model_card.json").read_text(encoding="utf-8"))
        test, details = card["metrics"]["test"], card["model_details"]
        model = details["description"] + (f" ({details['backbone']})" if details["backbone"]
                                          else "")
        size = sum(p.stat().st_size for p in folder.iterdir()) / 1e6
        lines.append(f"{name:<18} {model[:40]:<40} {test['n_test']:>13} "
                     f"{test['accuracy']:>8.3f} {test['macro_f1']:>8.3f} {size:>5.1f}")
    return "\n".join([*lines, "", f"model cards: {RELEASED}/<release>/model_card.html"])


def without_cutouts(page: str) -> str:
    """A card's HTML with each embedded figure of galaxy cutouts replaced by a short note."""
    return re.sub(rf"<img[^>]*{re.escape(CUTOUT_MARK)}[^>]*>", CUTOUT_NOTE, page)


def make_release(model_dir: Path, cards: Path, name: str, version: int,
                 into: Path = RELEASED) -> Path:
    """Copy a trained, evaluated model folder and its card into ``into/<name>-v<version>``."""
    import keras

    if not name.replace("-", "").replace("_", "").isalnum():
        raise ReleaseError(f"--name {name!r}: use letters, digits, '-' and '_'")
    target = into / f"{name}-v{version}"
    if target.exists():
        raise ReleaseError(f"{target} exists: a released version is never replaced; give "
                           "--version the next number")
    trained = TrainedModel.load(model_dir)  # the whole bundle, inference settings included
    card_base = cards / trained.summary.model
    missing = [str(card_base.with_suffix(s)) for s in (".html", ".json")
               if not card_base.with_suffix(s).is_file()]
    if missing:
        raise ReleaseError(f"model card {missing} not found; run the report stage first")
    with atomic_path(target) as tmp:
        tmp.mkdir(parents=True)
        # Without optimizer state: a released model is for inference.
        model = keras.saving.load_model(model_dir / MODEL_NAME, safe_mode=True, compile=False)
        model.save(tmp / MODEL_NAME)
        for file in (CONFIG_NAME, SUMMARY_NAME, HISTORY_NAME):
            shutil.copy2(model_dir / file, tmp / file)
        inference = InferenceSettings.load(model_dir)
        inference.model_sha256 = file_sha256(tmp / MODEL_NAME)
        inference.save(tmp)
        release = f"{name}-v{version}"
        # The card's Files line names the folder it was trained in; users have the release.
        card_json = json.loads(card_base.with_suffix(".json").read_text(encoding="utf-8"))
        trained_path = str(card_json["model_details"]["path"])
        shipped_path = f"pipeline/released/{release}/{MODEL_NAME}"
        card_json["model_details"]["path"] = shipped_path
        card = card_base.with_suffix(".html").read_text(encoding="utf-8")
        (tmp / "model_card.html").write_text(
            without_cutouts(card).replace(f"<code>{html.escape(trained_path)}</code>",
                                          f"<code>{shipped_path}</code>"), encoding="utf-8")
        (tmp / "model_card.json").write_text(json.dumps(card_json, indent=2) + "\n",
                                             encoding="utf-8")
        (tmp / RELEASE_NAME).write_text(json.dumps({
            "name": release, "model": name, "version": version,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "package_version": __version__, "git_revision": _git_revision(),
            "trained_model_sha256": trained.inference.model_sha256,  # checked by load
            "classes": list(trained.scheme.classes),
            "cite": CITATION.format(package=__version__, release=release),
        }, indent=2) + "\n")
    size = sum(p.stat().st_size for p in target.iterdir())
    log.info("released %s: %.1f MB in %s", target.name, size / 1e6, target)
    return target


def _git_revision() -> str:
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                              text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main() -> None:
    from pipeline.config import user_errors

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, help="a folder train and evaluate wrote")
    parser.add_argument("--cards", type=Path, default=Path("reports/cards"),
                        help="where the report stage wrote its model cards")
    parser.add_argument("--name", help="the release's name, e.g. gz1-transfer")
    parser.add_argument("--version", type=int, help="1, 2, ...: never reused")
    parser.add_argument("--list", action="store_true", help="list the released models")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.list:
        print(release_table() if available() else "no released models")
        return
    if not (args.model_dir and args.name and args.version):
        parser.error("--model-dir, --name and --version are needed (or --list)")
    with user_errors():
        make_release(args.model_dir, args.cards, args.name, args.version)


if __name__ == "__main__":
    sys.exit(main())

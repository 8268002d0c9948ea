"""Stage 2, prepare: normalise to [-1, 1] (:mod:`pipeline.preprocess`), split, and augment the
training set.

The split is stratified by class with its own seed. Augmented copies are made from training
galaxies only and keep their original's ``objid``, so no galaxy's copies cross splits.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf
from sklearn.model_selection import train_test_split

from pipeline.artifacts import (
    AUGMENTATIONS_NAME,
    CATALOG_COLUMNS,
    CATALOG_NAME,
    META_NAME,
    SKIPPED_NAME,
    SPLITS,
    PreparedMeta,
    SplitCounts,
)
from pipeline.augment import augment_copies
from pipeline.catalog import (
    check_class_counts,
    drop_duplicate_galaxies,
    galaxies_needed_per_class,
    read_csv_catalog,
)
from pipeline.config import stage_main
from pipeline.errors import MissingInputError, PipelineError
from pipeline.io import atomic_path, check_replaceable, ensure_free_space, save_arrays
from pipeline.labels import LabelScheme
from pipeline.preprocess import catalog_radii, kind_counts, load_images

log = logging.getLogger(__name__)


class DataError(PipelineError, ValueError):
    """The data cannot be prepared as configured; the message says which file and why."""


def read_catalog(raw: Path, scheme: LabelScheme) -> pd.DataFrame:
    path = raw / CATALOG_NAME
    if not path.is_file():
        raise MissingInputError(f"{path}: catalog not found; run the fetch stage first")
    catalog = read_csv_catalog(path, f"paths.raw ({raw})")
    missing = [c for c in CATALOG_COLUMNS if c not in catalog.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; a catalog needs "
                        f"{list(CATALOG_COLUMNS)}")
    unknown = sorted(set(catalog["label"]) - set(scheme.classes))
    if unknown:
        raise DataError(f"{path}: labels {unknown} are not in data.classes "
                        f"{list(scheme.classes)}")
    return catalog


def stratified_split(labels: np.ndarray, split: DictConfig, classes: tuple[str, ...]
                     ) -> dict[str, np.ndarray]:
    """Indices of train/val/test, stratified by class, from ``prepare.split.seed``."""
    counts = np.bincount(labels, minlength=len(classes))
    needed = galaxies_needed_per_class(split.val, split.test)
    too_few = {classes[k]: int(c) for k, c in enumerate(counts) if c < needed}
    if too_few:
        raise DataError(f"classes {too_few} have fewer than {needed} galaxies; a stratified "
                        f"split with val + test = {split.val + split.test:.2f} needs at least "
                        f"{needed} per class (get more data, or drop the class from "
                        "data.classes)")
    index = np.arange(len(labels))
    train, rest = train_test_split(index, train_size=split.train, stratify=labels,
                                   random_state=split.seed)
    val_share = split.val / (split.val + split.test)
    val, test = train_test_split(rest, train_size=val_share, stratify=labels[rest],
                                 random_state=split.seed)
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def save_augmentation_grid(originals: np.ndarray, copies: list[np.ndarray], path: Path) -> None:
    """Originals in the first column, their augmented copies beside them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows, n_cols = len(originals), 1 + len(copies)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.6 * n_cols, 1.6 * n_rows), squeeze=False)
    for r in range(n_rows):
        for c in range(n_cols):
            img = originals[r] if c == 0 else copies[c - 1][r]
            ax = axes[r, c]
            ax.imshow((img + 1) / 2, origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title("original" if c == 0 else f"augmented {c}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(cfg: DictConfig) -> PreparedMeta:
    """Prepare ``paths.raw`` into ``paths.prepared``; returns the metadata written."""
    raw, prepared = Path(cfg.paths.raw), Path(cfg.paths.prepared)
    check_replaceable(prepared, "paths.prepared", META_NAME)
    scheme = LabelScheme.from_names(cfg.data.classes)
    catalog = read_catalog(raw, scheme)
    # fetch drops repeated galaxies; a catalog made or edited by hand may still hold some.
    catalog, duplicates = drop_duplicate_galaxies(catalog, raw)
    loaded = load_images([raw / f for f in catalog["file"]], cfg.prepare,
                         catalog["objid"].tolist(), max_pixels=int(cfg.data.max_image_pixels),
                         workers=os.cpu_count() or 1,
                         radii=catalog_radii(catalog, cfg.prepare, str(raw / CATALOG_NAME)))
    images, kept, skipped = loaded.images, loaded.kept, loaded.skipped
    if skipped:
        log.warning("skipped %d cutout(s) (unreadable, or no size to measure); see "
                    "skipped.csv. First: %s", len(skipped), skipped[0]["reason"])
    if len(skipped) > cfg.data.max_bad_fraction * len(catalog):
        kept_list = prepared.with_name(f"{prepared.name}-{SKIPPED_NAME}")
        pd.DataFrame(skipped).to_csv(kept_list, index=False)
        raise DataError(f"{raw}: {len(skipped)} of {len(catalog)} cutouts are unreadable, more "
                        f"than data.max_bad_fraction = {cfg.data.max_bad_fraction}; all are "
                        f"listed in {kept_list}; first: {skipped[0]['reason']}")
    split_cfg = cfg.prepare.split
    check_class_counts(catalog[kept], list(scheme.classes), split_cfg.val, split_cfg.test,
                       f"{raw / CATALOG_NAME}")
    # Split every catalogued galaxy, then leave out the skipped ones: a cutout that cannot be
    # read (or measured) leaves a gap in its own split instead of reshuffling all the others,
    # so a galaxy's split does not depend on which other files happened to be usable.
    labels = scheme.encode(catalog["label"].tolist())
    position = np.cumsum(kept) - 1
    split = {name: position[idx[kept[idx]]]
             for name, idx in stratified_split(labels, split_cfg, scheme.classes).items()}
    catalog, images, labels = catalog[kept].reset_index(drop=True), images[kept], labels[kept]
    train_kinds = kind_counts(loaded.flux[kept][split["train"]])
    n_copies = int(cfg.augment.copies) if cfg.augment.mode == "stored" else 0
    # float16 images, plus the augmented copies of the training split
    ensure_free_space(prepared.parent, images[:1].nbytes // 2 * (len(images) + n_copies * len(
        split["train"])), "writing the prepared images")

    grid_n = min(int(cfg.prepare.grid_examples), len(split["train"]))
    with atomic_path(prepared, signature=META_NAME, key="paths.prepared") as tmp:
        tmp.mkdir(parents=True)
        for name in SPLITS:
            idx = split[name]
            x, y = images[idx], labels[idx]
            objid = catalog["objid"].to_numpy(dtype=str)[idx]
            augmented = np.zeros(len(idx), dtype=bool)
            if name == "train" and n_copies > 0:
                copies, source = augment_copies(x, cfg.augment, seed=int(cfg.seed))
                x = np.concatenate([x, copies])
                y = np.concatenate([y, y[source]])
                objid = np.concatenate([objid, objid[source]])
                augmented = np.concatenate([augmented, np.ones(len(copies), dtype=bool)])
            save_arrays(tmp / name, images=x.astype(np.float16), labels=y,
                        objid=objid, augmented=augmented)
        # The picture grid: a few training galaxies beside fresh copies drawn with the same config.
        train_labels = labels[split["train"]]
        by_class = [split["train"][train_labels == k] for k in range(scheme.n_classes)]
        picks = [idx[r] for r in range(grid_n) for idx in by_class if r < len(idx)][:grid_n]
        grid_src = images[np.array(picks)]
        grid_copies = [augment_copies(grid_src, OmegaConf.merge(cfg.augment, {"copies": 1}),
                                      seed=int(cfg.seed) + k)[0] for k in range(1, 5)]
        save_augmentation_grid(grid_src, grid_copies, tmp / AUGMENTATIONS_NAME)
        pd.DataFrame(skipped, columns=["objid", "file", "reason"]).to_csv(
            tmp / SKIPPED_NAME, index=False)
        meta = PreparedMeta(
            classes=list(scheme.classes),
            image_size=int(cfg.prepare.image_size),
            center_crop=float(cfg.prepare.center_crop),
            normalization="asinh stretch to [-1, 1] (flux) | x/127.5-1 (display)",
            source=str(cfg.data.source),
            splits={name: SplitCounts(len(split[name]), {
                c: int((labels[split[name]] == k).sum()) for k, c in enumerate(scheme.classes)})
                for name in SPLITS},
            augmented_copies_per_galaxy=n_copies,
            augment_mode=str(cfg.augment.mode),
            n_skipped=len(skipped),
            n_duplicates_dropped=len(duplicates),
            framing=str(cfg.prepare.framing),
            galaxy_radius_fraction=(float(cfg.prepare.galaxy_radius_fraction)
                                    if cfg.prepare.framing != "fixed" else None),
            train_image_kinds=train_kinds,
        )
        meta.save(tmp)
    prepared.with_name(f"{prepared.name}-{SKIPPED_NAME}").unlink(missing_ok=True)  # stale now
    log.info("prepared %s: %s", prepared, {k: v.galaxies for k, v in meta.splits.items()})
    return meta


main = stage_main(run)

if __name__ == "__main__":
    main()

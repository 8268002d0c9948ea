"""Cutouts per second of the SDSS JPEG fetch against a local SkyServer with injected latency.

    python benchmarks/fetch_throughput.py [--galaxies 1000] [--latency 0.1] [--concurrency 8]

Prints the measured rate, the bound set by the concurrency (workers / latency) and their ratio.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests.fake_skyserver

from pipeline.config import compose, validate
from pipeline.sources.sdss import fetch_jpegs
from tests.fake_skyserver import FakeSkyServer, make_galaxies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--galaxies", type=int, default=1000)
    parser.add_argument("--latency", type=float, default=0.1)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()

    per_class = -(-args.galaxies // 3)
    galaxies = make_galaxies(per_class)[: args.galaxies]
    server = FakeSkyServer(galaxies, latency_s=args.latency)
    url = server.start()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = validate(compose([
            "data=sdss", f"data.sdss.skyserver_url={url}",
            f"data.sdss.concurrency={args.concurrency}", "data.sdss.jpeg.size=128",
            "data.sdss.jpeg.scale_mode=fixed", f"data.sdss.cache_dir={tmp}"]))
        catalog = pd.DataFrame({"objid": [str(g.objid) for g in galaxies],
                                "ra": [g.ra for g in galaxies], "dec": [g.dec for g in galaxies],
                                "label": [g.label for g in galaxies]})
        start = time.perf_counter()
        done, failures, _ = fetch_jpegs(catalog, cfg, Path(tmp) / "jpeg")
        seconds = time.perf_counter() - start
    server.stop()
    rate = len(done) / seconds
    bound = args.concurrency / args.latency
    print(f"galaxies: {len(done)} fetched, {len(failures)} failed in {seconds:.2f} s")
    print(f"rate: {rate:.1f} cutouts/s")
    print(f"bound (concurrency / latency): {bound:.1f} cutouts/s")
    print(f"ratio: {rate / bound:.1%} (target >= 80%)")


if __name__ == "__main__":
    main()

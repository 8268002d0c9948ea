"""A stand-in for SDSS on 127.0.0.1 that answers the real paths in the real formats.

* ``/dr{N}/en/tools/search/x_results.aspx?cmd=SQL&format=csv`` (what astroquery's
  ``SDSS.query_sql`` calls): CSV that starts with SkyServer's ``#Table1`` line;
* ``/dr{N}/SkyServerWS/ImgCutout/getjpeg?ra=&dec=&scale=&width=&height=``: JPEG bytes;
* ``/sas/dr{N}/eboss/photoObj/frames/{rerun}/{run}/{camcol}/frame-{band}-...fits.bz2``:
  bz2-compressed FITS frames with an SDSS-style TAN WCS (CRVAL/CRPIX/CD matrix).

Faults can be injected per request kind: a 500, a response slower than the client's timeout,
a body trickled out a few bytes at a time (each read quick, the whole slow), a truncated body,
or corrupt bytes, each for the first few requests of a galaxy. ``sql_bodies`` replaces the
CSV of a class's query with exact bytes (an HTML page, a CSV with missing columns, ...).
"""

from __future__ import annotations

import bz2
import contextlib
import io
import re
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import numpy as np
from astropy.io import fits
from PIL import Image

CLASS_BY_CONDITION = {"p_el_debiased": "elliptical", "p_cw + z.p_acw": "spiral",
                      "p_edge": "edge_on", "p_mg": "merger"}
FRAME_SIZE = (400, 600)  # rows, columns: small stand-ins for 1489 x 2048 SDSS frames
PIXEL_SCALE = 0.396


@dataclass
class Galaxy:
    objid: int
    ra: float
    dec: float
    label: str
    run: int = 1000
    camcol: int = 3
    field: int = 100


@dataclass
class FakeSkyServer:
    galaxies: list[Galaxy]
    latency_s: float = 0.0
    faults: dict[str, tuple[str, int]] = field(default_factory=dict)  # ra key -> (kind, times)
    jpeg_bytes: dict[str, bytes] = field(default_factory=dict)  # "ra,dec" -> exact response
    sql_bodies: dict[str, bytes] = field(default_factory=dict)  # class -> exact SQL reply
    requests: list[str] = field(default_factory=list)
    _seen: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # ------------------------------------------------------------------ responses
    def sql_csv(self, sql: str) -> bytes:
        cone = re.search(r"fGetNearbyObjEq\(([-\d.e]+), ([-\d.e]+), ([-\d.e]+)\)", sql)
        if cone:
            return self.cone_csv(*map(float, cone.groups()), int(re.search(r"TOP (\d+)",
                                                                           sql).group(1)))
        where = sql.split(" WHERE ", 1)[1]
        label = next(c for k, c in CLASS_BY_CONDITION.items() if k in where)
        if label in self.sql_bodies:
            return self.sql_bodies[label]
        top = int(re.search(r"TOP (\d+)", sql).group(1))
        rows = [g for g in self.galaxies if g.label == label][:top]
        lines = ["#Table1", "objid,ra,dec,p_el_debiased,p_cs_debiased,p_cw,p_acw,p_edge,p_mg,"
                 "p_dk,nvote,petroR90_r,run,rerun,camcol,field"]
        for g in rows:
            votes = {"elliptical": "0.9,0.05,0.02,0.02,0.01", "spiral": "0.05,0.9,0.45,0.45,0.02",
                     "edge_on": "0.05,0.9,0.02,0.03,0.85"}.get(label, "0.1,0.1,0.1,0.1,0.1")
            lines.append(f"{g.objid},{g.ra},{g.dec},{votes},0.0,0.0,40,6.5,{g.run},301,"
                         f"{g.camcol},{g.field}")
        return ("\n".join(lines) + "\n").encode()

    def cone_csv(self, ra: float, dec: float, radius_arcmin: float, top: int) -> bytes:
        """Galaxies within the radius, nearest first, as the CAS answers fGetNearbyObjEq."""
        def distance(g: Galaxy) -> float:  # arcmin, flat sky: the test cones are small
            return 60 * float(np.hypot((g.ra - ra) * np.cos(np.deg2rad(dec)), g.dec - dec))

        near = sorted((g for g in self.galaxies if distance(g) <= radius_arcmin), key=distance)
        lines = ["#Table1", "objid,ra,dec,petroR90_r,petroMag_r,run,rerun,camcol,field"]
        lines += [f"{g.objid},{g.ra},{g.dec},6.5,16.5,{g.run},301,{g.camcol},{g.field}"
                  for g in near[:top]]
        return ("\n".join(lines) + "\n").encode()

    def jpeg(self, ra: float, dec: float, width: int, height: int) -> bytes:
        key = f"{ra:.6f},{dec:.6f}"
        if key in self.jpeg_bytes:
            return self.jpeg_bytes[key]
        rng = np.random.default_rng(abs(hash(key)) % 2**32)
        y, x = np.indices((height, width))
        blob = 200 * np.exp(-0.5 * (((x - width / 2) ** 2 + (y - height / 2) ** 2) / 60))
        rgb = np.clip(blob[..., None] + rng.normal(10, 4, (height, width, 3)), 0, 255)
        buf = io.BytesIO()
        Image.fromarray(rgb.astype(np.uint8)).save(buf, format="JPEG", quality=90)
        return buf.getvalue()

    def frame(self, run: int, camcol: int, field_: int, band: str) -> bytes:
        """A frame whose centre is the mean position of the galaxies on it."""
        on = [g for g in self.galaxies if (g.run, g.camcol, g.field) == (run, camcol, field_)]
        ra0 = float(np.mean([g.ra for g in on])) if on else 150.0
        dec0 = float(np.mean([g.dec for g in on])) if on else 2.0
        rows, cols = FRAME_SIZE
        header = fits.Header()
        header.update({"CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CRVAL1": ra0,
                       "CRVAL2": dec0, "CRPIX1": cols / 2 + 0.5, "CRPIX2": rows / 2 + 0.5,
                       "CD1_1": -PIXEL_SCALE / 3600, "CD1_2": 0.0, "CD2_1": 0.0,
                       "CD2_2": PIXEL_SCALE / 3600, "EQUINOX": 2000.0, "RADESYS": "ICRS",
                       "FILTER": band, "BUNIT": "nanomaggy", "RUN": run, "CAMCOL": camcol,
                       "FIELD": field_})
        from astropy.wcs import WCS

        wcs = WCS(header)
        rng = np.random.default_rng(run * 7 + camcol * 3 + field_ + ord(band))
        image = rng.normal(0, 0.02, FRAME_SIZE).astype(np.float32)
        yy, xx = np.indices(FRAME_SIZE)
        for g in on:
            px, py = wcs.world_to_pixel_values(g.ra, g.dec)
            image += 5 * np.exp(-0.5 * ((xx - px) ** 2 + (yy - py) ** 2) / 9).astype(np.float32)
        buf = io.BytesIO()
        fits.PrimaryHDU(image, header=header).writeto(buf)
        return bz2.compress(buf.getvalue())

    # ------------------------------------------------------------------ serving
    def fault_for(self, key: str) -> str | None:
        with self._lock:
            self._seen[key] += 1
            kind, times = self.faults.get(key, (None, 0))
            return kind if self._seen[key] <= times else None

    def handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def reply(self, body: bytes, ctype: str, fault: str | None = None) -> None:
                if fault == "500":
                    self.send_response(500)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if fault == "slow":
                    time.sleep(2.0)
                if fault == "corrupt":
                    body = body[:20] + bytes(200) + body[220:]
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if fault == "truncated":
                    body = body[: len(body) // 2]
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    if fault == "drip":  # 16 pieces 0.25 s apart: no read waits long
                        step = max(1, -(-len(body) // 16))
                        for start in range(0, len(body), step):
                            self.wfile.write(body[start:start + step])
                            self.wfile.flush()
                            time.sleep(0.25)
                        return
                    self.wfile.write(body)

            def do_GET(self):
                url = urlparse(self.path)
                q = {k: v[0] for k, v in parse_qs(url.query).items()}
                with server._lock:
                    server.requests.append(self.path)
                if server.latency_s:
                    time.sleep(server.latency_s)
                if url.path.endswith("/en/tools/search/x_results.aspx"):
                    return self.reply(server.sql_csv(q["cmd"]), "text/plain",
                                      server.fault_for("sql"))
                if url.path.endswith("/SkyServerWS/ImgCutout/getjpeg"):
                    ra, dec = float(q["ra"]), float(q["dec"])
                    body = server.jpeg(ra, dec, int(q["width"]), int(q["height"]))
                    return self.reply(body, "image/jpeg", server.fault_for(f"{ra:.6f}"))
                m = re.search(r"frame-([ugriz])-(\d{6})-(\d)-(\d{4})\.fits\.bz2$", url.path)
                if m:
                    band, run, camcol, fld = m.group(1), *map(int, m.groups()[1:])
                    return self.reply(server.frame(run, camcol, fld, band),
                                      "application/x-bzip2", server.fault_for(f"frame{run}"))
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

        return Handler

    def start(self) -> str:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self.handler())
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def make_galaxies(n_per_class: int, classes=("elliptical", "spiral", "edge_on"),
                  fields: int = 2) -> list[Galaxy]:
    rng = np.random.default_rng(0)
    out = []
    for k, label in enumerate(classes):
        for i in range(n_per_class):
            f = i % fields
            # Galaxies of one field sit within a few arcminutes of each other.
            ra = 150.0 + f * 0.5 + rng.uniform(-0.01, 0.01)
            dec = 2.0 + rng.uniform(-0.005, 0.005)
            out.append(Galaxy(1237650000000000000 + k * 10000 + i, round(ra, 6),
                              round(dec, 6), label, run=1000 + f))
    return out

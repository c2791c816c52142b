#!/usr/bin/env python3
"""Check in a real headless browser that an onnxfbp HTML report renders and that
every image in it decodes.

    python tools/check_report_browser.py REPORT.json --html report.html --screenshot report.png
    python tools/check_report_browser.py report.html --screenshot report.png

A ``.json`` input is rendered first (``onnxfbp.output.report.render_html``). Then:

1. static: every ``<img>`` is a ``data:image/png;base64,...`` URI whose bytes are
   a PNG with a non-zero size, and nothing else is loaded from elsewhere
   (no ``src``/``href`` to http:, https:, file: or a relative path; no
   ``<link rel=stylesheet>``, no ``url(...)`` in styles);
2. browser: a copy of the page with a small script appended is loaded in
   headless Chromium with ``--dump-dom``. In the ``load`` event the script
   checks every image (``complete``, ``naturalWidth``/``naturalHeight`` > 0, and
   drawn into a canvas it has non-blank pixels) and writes the result as JSON
   into ``<pre id="onnxfbp-image-check">``, synchronously, so the dumped DOM
   always holds it; no marker means the script never ran, which fails the check;
3. screenshot: the original page (without the script) is captured at the full
   page height the script measured (capped by ``--max-height``), and the PNG
   is checked not to be blank.

Prints one JSON summary on stdout. Exit status: 0 all checks passed, 1 some
check failed, 2 usage error or no Chromium found (set ``CHROMIUM`` to its path).

Chromium runs with ``--headless --no-sandbox`` (needed as root and in most
containers; the page is a local file written by onnxfbp) and a throw-away
profile, with background networking, component updates and sync disabled.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
MARKER_ID = "onnxfbp-image-check"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

PROBE_SCRIPT = """
<script>
window.addEventListener("load", function () {
  // Runs synchronously inside the load event, so --dump-dom always sees its marker.
  var imgs = Array.prototype.slice.call(document.images);
  var out = {total: imgs.length, decoded: 0, failed: [], sizes: [], ink: []};
  var canvas = document.createElement("canvas");
  imgs.forEach(function (img) {
    var name = img.alt || img.src.slice(0, 48);
    var ok = img.complete && img.naturalWidth > 0 && img.naturalHeight > 0;
    var ink = null;
    if (ok) {
      try {  // draw it: the pixels must really be there, not just the PNG header
        var w = Math.min(img.naturalWidth, 320);
        var h = Math.max(1, Math.round(img.naturalHeight * w / img.naturalWidth));
        canvas.width = w; canvas.height = h;
        var ctx = canvas.getContext("2d");
        ctx.clearRect(0, 0, w, h);
        ctx.drawImage(img, 0, 0, w, h);
        var px = ctx.getImageData(0, 0, w, h).data, n = 0;
        for (var i = 0; i < px.length; i += 4) {
          if (px[i + 3] > 0 && (px[i] < 235 || px[i + 1] < 235 || px[i + 2] < 235)) { n++; }
        }
        ink = n / (w * h);
        if (ink === 0) { ok = false; }
      } catch (e) { ink = null; }  // a tainted canvas: keep the naturalWidth verdict
    }
    if (ok) { out.decoded++; } else { out.failed.push(name); }
    out.sizes.push([img.naturalWidth, img.naturalHeight, img.clientWidth, img.clientHeight]);
    out.ink.push(ink === null ? null : Math.round(ink * 1000) / 1000);
  });
  out.height = Math.ceil(Math.max(document.documentElement.scrollHeight,
                                  document.body.scrollHeight));
  out.title = document.title;
  var pre = document.createElement("pre");
  pre.id = "@MARKER@";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>
""".replace("@MARKER@", MARKER_ID)


def find_chromium(explicit: str | None = None) -> str | None:
    """Path of a Chromium/Chrome binary: ``explicit``, ``$CHROMIUM``, or the PATH."""
    for name in (explicit, os.environ.get("CHROMIUM"), *CANDIDATES):
        if name:
            found = shutil.which(name)
            if found:
                return found
    return None


class _Resources(HTMLParser):
    """Collects image sources and any reference to something outside the file."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[tuple[str, str]] = []  # (alt, src)
        self.external: list[str] = []
        self._in_style = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "img":
            self.images.append((a.get("alt", ""), a.get("src", "")))
        for key in ("src", "href", "srcset", "poster", "data"):
            value = a.get(key)
            if value and not value.startswith(("data:", "#")):
                self.external.append(f"<{tag} {key}={value[:80]!r}>")
        if "url(" in a.get("style", "") and "url(data:" not in a.get("style", ""):
            self.external.append(f"<{tag} style=url(...)>")
        self._in_style = tag == "style"

    def handle_endtag(self, tag: str) -> None:
        if tag == "style":
            self._in_style = False

    def handle_data(self, data: str) -> None:
        if self._in_style and re.search(r"url\((?!\s*['\"]?data:)|@import", data):
            self.external.append("<style> url(...)/@import")


def png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR, or None if ``data`` is not a PNG."""
    if len(data) < 24 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


def static_check(page: str) -> dict[str, Any]:
    parser = _Resources()
    parser.feed(page)
    problems = list(parser.external)
    sizes = []
    for alt, src in parser.images:
        prefix = "data:image/png;base64,"
        if not src.startswith(prefix):
            problems.append(f"image {alt!r} is not an embedded PNG ({src[:40]!r})")
            continue
        try:
            size = png_size(base64.b64decode(src[len(prefix):], validate=True))
        except ValueError:
            size = None
        if not size or min(size) == 0:
            problems.append(f"image {alt!r}: base64 data is not a PNG with a size")
        else:
            sizes.append(list(size))
    return {"images": len(parser.images), "png_sizes": sizes, "problems": problems}


def _chromium(binary: str, args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="onnxfbp-chromium-") as profile:
        cmd = [
            binary, "--headless", "--no-sandbox", "--disable-gpu",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--no-first-run",
            "--disable-default-apps", "--disable-extensions", "--mute-audio", "--hide-scrollbars",
            f"--user-data-dir={profile}", *args,
        ]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def browser_check(binary: str, page: Path, width: int, timeout: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="onnxfbp-probe-") as tmp:
        probe = Path(tmp) / "probe.html"
        text = page.read_text(encoding="utf-8")
        text = text.replace("</body>", PROBE_SCRIPT + "</body>") if "</body>" in text \
            else text + PROBE_SCRIPT
        probe.write_text(text, encoding="utf-8")
        # Same width as the screenshot, so the measured page height fits it.
        proc = _chromium(binary, ["--dump-dom", f"--window-size={width},900",
                                  probe.resolve().as_uri()], timeout)
    m = re.search(rf'<pre id="{MARKER_ID}">(.*?)</pre>', proc.stdout, re.S)
    if m is None:
        tail = (proc.stderr.strip().splitlines() or [""])[-1]
        why = f"the check script left no marker (exit {proc.returncode}; {tail[:200]})"
        return {"ran": False, "problems": [why]}
    result = json.loads(html.unescape(m.group(1)))
    problems = [f"image did not decode in the browser: {name}" for name in result["failed"]]
    if result["decoded"] != result["total"]:
        problems.append(f"{result['decoded']} of {result['total']} images decoded")
    result.update(ran=True, problems=problems)
    return result


def screenshot(binary: str, page: Path, out: Path, width: int, height: int,
               timeout: float) -> dict[str, Any]:
    out.unlink(missing_ok=True)
    proc = _chromium(binary, [f"--screenshot={out.resolve()}", f"--window-size={width},{height}",
                              page.resolve().as_uri()], timeout)
    if not out.is_file() or out.stat().st_size == 0:
        return {"problems": [f"no screenshot written (exit {proc.returncode})"]}
    info: dict[str, Any] = {"path": str(out), "bytes": out.stat().st_size, "problems": []}
    size = png_size(out.read_bytes()[:32])
    info["size"] = list(size) if size else None
    try:
        import numpy as np  # noqa: PLC0415
        from matplotlib.image import imread  # noqa: PLC0415

        pixels = np.asarray(imread(out))[..., :3]
        info["distinct_colours"] = int(len(np.unique(pixels.reshape(-1, 3)[::7], axis=0)))
        info["ink_fraction"] = round(float((np.abs(pixels - pixels[0, 0]).sum(axis=-1) > 0.05)
                                           .mean()), 4)
        if info["ink_fraction"] < 0.01:
            info["problems"].append("the screenshot is (nearly) blank")
    except ImportError:  # numpy/matplotlib missing: size check only
        pass
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", help="a JSON report (rendered first) or an HTML report")
    parser.add_argument("--html", help="where to write the rendered HTML (JSON input)")
    parser.add_argument("--screenshot", help="where to write the PNG screenshot")
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--max-height", type=int, default=16000,
                        help="cap of the screenshot height (default: full page up to 16000)")
    parser.add_argument("--chromium", help="browser binary (default: $CHROMIUM, then the PATH)")
    parser.add_argument("--timeout", type=float, default=90.0, help="seconds per browser run")
    args = parser.parse_args(argv)

    source = Path(args.input)
    if not source.is_file():
        print(f"check_report_browser: {source} not found", file=sys.stderr)
        return 2
    binary = find_chromium(args.chromium)
    if binary is None:
        print("check_report_browser: no Chromium found (install chromium or set CHROMIUM)",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="onnxfbp-report-") as tmp:
        if source.suffix.lower() == ".json":
            sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
            from onnxfbp.errors import OnnxfbpError  # noqa: PLC0415
            from onnxfbp.output.html import render_html  # noqa: PLC0415

            page = Path(args.html) if args.html else Path(tmp) / "report.html"
            try:
                render_html(source, page, force=True)  # --html names the page to (re)write
            except OnnxfbpError as exc:
                print(f"check_report_browser: {exc}", file=sys.stderr)
                return 2
        else:
            page = source
        summary: dict[str, Any] = {"html": str(page), "chromium": binary}
        summary["static"] = static_check(page.read_text(encoding="utf-8"))
        summary["browser"] = browser_check(binary, page, args.width, args.timeout)
        if args.screenshot:
            height = min(max(int(summary["browser"].get("height") or 2000), 600), args.max_height)
            summary["screenshot"] = screenshot(binary, page, Path(args.screenshot), args.width,
                                               height, args.timeout)
    problems = [p for part in ("static", "browser", "screenshot")
                for p in summary.get(part, {}).get("problems", [])]
    if summary["static"]["images"] == 0:
        problems.append("the page has no images")
    summary["ok"] = not problems
    print(json.dumps(summary, indent=2))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

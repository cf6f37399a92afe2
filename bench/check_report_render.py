"""Check that a cl-release report renders in headless Chromium: DOM built, every image decoded.

    python bench/check_report_render.py reports/index.html [--screenshot shot.png]

The report's inline script writes ``data-images="loaded/total"`` on <body> after the page's
load event; ``--dump-dom`` prints the DOM after that, so the count tells whether every PNG
was found and decoded by the browser. Exit 0 when all images loaded and the table rendered.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("html", type=Path)
    ap.add_argument("--screenshot", type=Path, help="Also save a PNG screenshot of the page.")
    args = ap.parse_args()
    browser = find_chromium()
    if browser is None:
        print("chromium not found (apt-get install chromium)", file=sys.stderr)
        return 2
    url = args.html.resolve().as_uri()
    with tempfile.TemporaryDirectory() as profile:
        common = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  f"--user-data-dir={profile}", "--virtual-time-budget=5000"]
        dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=90)
        if dom.returncode != 0:
            print(dom.stderr[-2000:], file=sys.stderr)
            return 1
        if args.screenshot:
            subprocess.run([*common, f"--screenshot={args.screenshot.resolve()}", "--window-size=1100,2400", url],
                           capture_output=True, text=True, timeout=90, check=True)
    m = re.search(r'<body[^>]*data-images="(\d+)/(\d+)"', dom.stdout)
    rows = len(re.findall(r"<tr>", dom.stdout))
    if not m:
        print("the page did not finish loading (no data-images on <body>)", file=sys.stderr)
        return 1
    loaded, total = int(m[1]), int(m[2])
    print(f"{args.html}: {loaded}/{total} images decoded, {rows} table rows")
    return 0 if loaded == total and total > 0 and rows > 1 else 1


if __name__ == "__main__":
    sys.exit(main())

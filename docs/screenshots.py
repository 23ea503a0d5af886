"""Make docs/images/web-*.jpg: the console's pages, on the plaza footage, in Debian's chromium (Playwright).

    .venv/bin/python docs/screenshots.py        # needs ../shared and /usr/bin/chromium (make test installs it)
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("VIGILD_SHARED", ROOT.parent / "shared")).resolve()
MODELS = SHARED / "models" / "yolo-fastest-1.1"
IMAGES = ROOT / "docs" / "images"


def main() -> None:
    from playwright.sync_api import sync_playwright

    place = Path(tempfile.mkdtemp(prefix="vigild-shots-"))
    place.chmod(0o700)
    config = place / "vigild.yaml"
    config.write_text(f"""cameras:
  plaza:
    source: {SHARED / "media" / "vtest.avi"}
    loop: true
    zones:
      path: {{points: [[0, 0.31], [1, 0.21], [1, 0.73], [0, 0.73]], normalized: true}}
    lines:
      crossing: {{points: [[250, 120], [250, 576]]}}
plugins:
  - type: detector
    backend: darknet
    cfg: {MODELS}/yolo-fastest-1.1-xl.cfg
    weights: {MODELS}/yolo-fastest-1.1-xl.weights
    names: {MODELS}/coco.names
    classes: [person]
    input_size: 320
  - type: bytetrack
  - type: analytics
    snapshot: crop
publisher:
  endpoint: ipc://{place}/pub
control:
  endpoint: ipc://{place}/control
web:
  listen: 127.0.0.1:0
""")
    env = {**os.environ, "XDG_STATE_HOME": str(place / "state"), "YOLO_OFFLINE": "1"}
    log = place / "log.txt"
    daemon = subprocess.Popen([sys.executable, "-m", "vigild", "run", "--config", str(config)], env=env,
                              stderr=log.open("w"))  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (found := re.search(r"web console: (\S+)\?token=(\S+)", log.read_text())):
            if time.monotonic() > deadline or daemon.poll() is not None:
                raise SystemExit(log.read_text())
            time.sleep(0.5)
        url, token = found.group(1), found.group(2)
        time.sleep(20)  # some events first
        IMAGES.mkdir(exist_ok=True)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                                                 args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])  # fmt: skip
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(f"{url}?token={token}")
            time.sleep(4)
            page.screenshot(path=str(IMAGES / "web-grid.jpg"), type="jpeg", quality=85)
            page.goto(f"{url}#/camera/plaza")
            time.sleep(4)
            page.screenshot(path=str(IMAGES / "web-camera.jpg"), type="jpeg", quality=85)
            page.goto(f"{url}#/events")
            page.wait_for_selector("#events tbody tr")
            page.click("#events tbody tr.has-snapshot")
            time.sleep(1)
            page.screenshot(path=str(IMAGES / "web-events.jpg"), type="jpeg", quality=85)
            page.goto(f"{url}#/editor/plaza")
            page.wait_for_selector("#editor-canvas")
            time.sleep(1)
            page.screenshot(path=str(IMAGES / "web-editor.jpg"), type="jpeg", quality=85)
            browser.close()
    finally:
        daemon.terminate()
        daemon.wait(30)
    print(f"screenshots in {IMAGES}")


if __name__ == "__main__":
    main()

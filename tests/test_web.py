"""The web console (vigild.web, docs/web.md): its token, origins and API against a running daemon over real HTTP and
WebSockets, and its pages in Debian's chromium driven by Playwright (`executable_path`: Playwright's own browser
download cannot work here). The daemon reads the plaza footage through Yolo-Fastest, ByteTrack and the analytics."""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import sqlite3
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import VTEST, daemon_env, write_video, yolo_fastest_yaml
from service import Service, service_config

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]
CHROMIUM = Path("/usr/bin/chromium")
PLUGINS = f"{yolo_fastest_yaml(0.3)}\n  - type: bytetrack\n  - type: analytics\n    snapshot: crop\n"
CROSSING = "    lines:\n      crossing: {points: [[250, 120], [250, 576]]}\n"


def config_for(tmp_path: Path, cameras: str, web: str = "  listen: 127.0.0.1:0\n") -> Path:
    journal = tmp_path / "journal.db"
    return service_config(tmp_path, cameras, f"ipc://{tmp_path}/pub", plugins=PLUGINS,
                          extra=f"journal:\n  path: {journal}\nweb:\n{web}")  # fmt: skip


def console(service: Service, timeout: float = 120) -> tuple[str, str]:
    """The console's URL and token, from the line the daemon logs (as a user finds them)."""
    deadline = time.monotonic() + timeout
    while True:
        found = re.search(r"web console: (http://[^/\s]+/)\?token=([A-Za-z0-9_-]+)", service.log_text())
        if found:
            return found.group(1), found.group(2)
        if service.process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"no console URL in the log: {service.log_text()[-2000:]}")
        time.sleep(0.2)


def request(url: str, path: str, method: str = "GET", headers: dict[str, str] | None = None,
            body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:  # fmt: skip
    host = url.split("//")[1].rstrip("/")
    connection = http.client.HTTPConnection(host, timeout=30)
    connection.request(method, path, body=body, headers=headers or {})
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, data


def api(url: str, token: str, path: str, method: str = "GET", payload: object = None) -> tuple[int, object]:
    headers = {"Authorization": f"Bearer {token}"}
    body = None
    if payload is not None:
        headers["Content-Type"] = "application/json"
        body = json.dumps(payload).encode()
    status, _, data = request(url, path, method, headers, body)
    return status, json.loads(data) if data[:1] in (b"{", b"[") else data


def wait(condition, what: str, service: Service, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while True:
        got = condition()
        if got:
            return got
        if service.process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"never: {what}; log: {service.log_text()[-2500:]}")
        time.sleep(0.3)


def journal_events(tmp_path: Path, **where: str) -> list[dict]:
    if not (tmp_path / "journal.db").exists():
        return []
    db = sqlite3.connect(f"file:{tmp_path / 'journal.db'}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT body FROM events ORDER BY seq").fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        db.close()
    events = [json.loads(body) for (body,) in rows]
    return [e for e in events if all(e.get(k) == v for k, v in where.items())]


def live_frames(url: str, token: str, camera: str, count: int, origin: str | None = None) -> list[dict]:
    """`count` messages of the live WebSocket, decoded: header, and whether the rest is a JPEG."""
    import aiohttp

    async def run() -> list[dict]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if origin:
            headers["Origin"] = origin
        got: list[dict] = []
        async with (aiohttp.ClientSession(headers=headers) as session,
                    session.ws_connect(f"{url}api/v1/cameras/{camera}/live") as socket):  # fmt: skip
            async for message in socket:
                (length,) = struct.unpack(">I", message.data[:4])
                header = json.loads(message.data[4 : 4 + length])
                header["jpeg"] = message.data[4 + length : 4 + length + 2] == b"\xff\xd8"
                got.append(header)
                if len(got) == count:
                    return got
        return got

    return asyncio.run(asyncio.wait_for(run(), 60))


async def _both(make):
    return await asyncio.gather(make(), make())


def handshake_status(url: str, token: str, camera: str, origin: str | None) -> int:
    import aiohttp

    try:
        live_frames(url, token, camera, 1, origin)
    except aiohttp.WSServerHandshakeError as exc:
        return exc.status
    return 101


def test_the_token_origins_and_the_api(tmp_path):
    """Without the token: 401 for the page, the API and the WebSocket; `?token=` sets an HttpOnly, SameSite=Strict
    cookie and redirects to the URL without it; the token file is 0600. A write from another origin and a WebSocket
    from another Origin are refused; no path leaves the snapshots or the assets; a body over 1 MiB is refused. The
    API lists the cameras, the journal's events for a filter (newest first, paged) and their snapshots; the live
    WebSocket sends JPEGs with their frame's boxes; a self-intersecting zone is refused with its key and changes
    nothing; a line saved through the API gives `line.cross` events for it without restarting the camera."""
    config = config_for(tmp_path, f"  plaza:\n    source: {VTEST}\n    loop: true\n{CROSSING}")
    state = tmp_path / "state"
    service = Service(tmp_path, config, environ={"XDG_STATE_HOME": str(state)})
    try:
        url, token = console(service)
        token_files = list(state.glob("vigild/*/web-token"))
        assert len(token_files) == 1 and token_files[0].read_text().strip() == token and len(token) >= 16
        assert token_files[0].stat().st_mode & 0o777 == 0o600
        for path in ("/", "/api/v1/cameras", "/api/v1/events", "/static/app.js"):
            assert request(url, path)[0] == 401, path
        assert request(url, "/api/v1/cameras", headers={"Authorization": "Bearer " + "x" * 32})[0] == 401
        assert handshake_status(url, "", "plaza", None) == 401
        status, headers, _ = request(url, f"/?token={token}")
        assert status == 303 and headers["location"] == "/"
        cookie = headers["set-cookie"]
        assert f"vigild_token={token}" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
        session = {"Cookie": f"vigild_token={token}"}
        status, headers, page = request(url, "/", headers=session)
        assert status == 200 and b"/static/app.js" in page and b"<script>" not in page
        assert "script-src 'self'" in headers["content-security-policy"] and "unsafe-inline" not in headers["content-security-policy"]
        body = json.dumps({"zones": {}, "lines": {}}).encode()
        evil = {**session, "Origin": "http://evil.example", "Content-Type": "application/json"}
        assert request(url, "/api/v1/cameras/plaza/geometry", "PUT", evil, body)[0] == 403
        assert request(url, "/api/v1/cameras/plaza/geometry", "PUT", {**session, "Content-Type": "application/json"},
                       body)[0] == 403  # a cookie alone, no Origin: not a write of the console's pages  # fmt: skip
        assert handshake_status(url, token, "plaza", "http://evil.example") == 403
        for path in ("/static/../server.py", "/static/%2e%2e%2fserver.py", "/static/..%2Fauth.py",
                     "/api/v1/events/..%2F..%2Fjournal.db/snapshot.jpg", "/api/v1/events/../../journal.db/snapshot.jpg"):  # fmt: skip
            status, _, data = request(url, path, headers=session)
            assert status in (400, 404) and b"import" not in data and b"SQLite" not in data, (path, status)
        big = b'{"zones": {}, "lines": {}, "x": "' + b"a" * (1 << 20) + b'"}'
        assert request(url, "/api/v1/cameras/plaza/geometry", "PUT",
                       {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}, big)[0] == 413  # fmt: skip

        crossings = wait(lambda: journal_events(tmp_path, type="line.cross", line="crossing"), "a crossing", service)
        status, cameras = api(url, token, "/api/v1/cameras")
        assert status == 200 and [c["name"] for c in cameras["cameras"]] == ["plaza"]
        assert cameras["cameras"][0]["state"] == "streaming" and "crossing" in cameras["cameras"][0]["lines"]
        status, page = api(url, token, "/api/v1/events?camera=plaza&type=line.cross&limit=1")
        newest = journal_events(tmp_path, type="line.cross")
        assert status == 200 and page["events"][0]["seq"] >= crossings[-1]["seq"]
        if len(newest) > 1:
            _, older = api(url, token, f"/api/v1/events?camera=plaza&type=line.cross&limit=1&before={page['events'][0]['seq']}")
            assert older["events"][0]["seq"] < page["events"][0]["seq"] and older["events"][0]["type"] == "line.cross"
        with_snapshot = next(e for e in crossings if e.get("snapshot"))
        status, jpeg = api(url, token, f"/api/v1/events/{with_snapshot['seq']}/snapshot.jpg")
        assert status == 200 and jpeg[:2] == b"\xff\xd8" and len(jpeg) == with_snapshot["snapshot"]["bytes"]
        assert api(url, token, "/api/v1/events/abc/snapshot.jpg")[0] == 400
        assert api(url, token, "/api/v1/cameras/nope/geometry")[0] == 404

        assert api(url, token, "/api/v1/status")[1]["web"]["live_encoded"] == 0, "nobody watched: nothing encoded"
        frames, second = asyncio.run(_both(lambda: asyncio.to_thread(live_frames, url, token, "plaza", 20)))
        encoded = api(url, token, "/api/v1/status")[1]["web"]["live_encoded"]
        common = {f["frame"] for f in frames} & {f["frame"] for f in second}
        assert len(common) >= 10, "two viewers at once get the same frames"
        assert encoded < len(frames) + len(second) - len(common) + 5, "each frame encoded once for both viewers"
        time.sleep(2)
        assert api(url, token, "/api/v1/status")[1]["web"]["live_encoded"] <= encoded + 2, "nobody watches: none"
        assert all(f["jpeg"] and f["camera"] == "plaza" and (f["width"], f["height"]) == (768, 576) for f in frames)
        assert [f["frame"] for f in frames] == sorted({f["frame"] for f in frames}), "newer frames, each once"
        assert any(box[5] == "person" and box[4] >= 0 for f in frames for box in f["boxes"])

        edits = list(state.glob("vigild/*/edits.yaml"))
        bad = {"zones": {"bowtie": {"points": [[0, 0], [1, 1], [1, 0], [0, 1]], "normalized": True}},
               "lines": {"crossing": {"points": [[250, 120], [250, 576]]}}}  # fmt: skip
        status, answer = api(url, token, "/api/v1/cameras/plaza/geometry", "PUT", bad)
        assert status == 422 and answer["problems"][0]["key"] == "cameras.plaza.zones.bowtie"
        assert "intersects itself" in answer["problems"][0]["message"]
        assert list(state.glob("vigild/*/edits.yaml")) == edits == []
        downs = len(journal_events(tmp_path, type="camera.down"))
        mid = {"points": [[0.5, 0.05], [0.5, 0.95]], "normalized": True}
        status, answer = api(url, token, "/api/v1/cameras/plaza/geometry", "PUT",
                             {"zones": {}, "lines": {"crossing": {"points": [[250, 120], [250, 576]]}, "mid": mid}})  # fmt: skip
        assert status == 200 and answer["applied"]["cameras"]["unchanged"] == ["plaza"], answer
        wait(lambda: journal_events(tmp_path, type="line.cross", line="mid"), "a crossing of the new line", service)
        assert len(journal_events(tmp_path, type="camera.down")) == downs, "the camera was not restarted"
        assert not [e for e in journal_events(tmp_path, type="track.end") if e.get("reason") == "source_end"]
        status, geometry = api(url, token, "/api/v1/cameras/plaza/geometry")
        assert geometry["lines"]["mid"] == mid and geometry["origins"]["lines.mid"].endswith("edits.yaml:7")
    finally:
        code, _ = service.stop()
    assert code == 0, service.log_text()[-3000:]
    checked = subprocess.run([sys.executable, "-m", "vigild", "check", "--config", str(config)], capture_output=True,
                             text=True, env=daemon_env(XDG_STATE_HOME=str(state)), timeout=120)  # fmt: skip
    assert checked.returncode == 0, checked.stderr
    assert re.search(r"line mid: .*edits\.yaml:\d+", checked.stdout) and re.search(r"line crossing: .*vigild\.yaml:\d+", checked.stdout)


def test_a_bind_beyond_loopback_needs_tls_or_insecure(tmp_path):
    config = config_for(tmp_path, f"  plaza:\n    source: {VTEST}\n", web="  listen: 0.0.0.0:8080\n")
    checked = subprocess.run([sys.executable, "-m", "vigild", "check", "--config", str(config)], capture_output=True,
                             text=True, env=daemon_env(), timeout=120)  # fmt: skip
    assert checked.returncode == 2
    assert re.search(r"vigild\.yaml:\d+: web: .*beyond loopback, without TLS", checked.stderr), checked.stderr
    config.write_text(config.read_text().replace("  listen: 0.0.0.0:8080\n", "  listen: 0.0.0.0:8080\n  insecure: true\n"))
    checked = subprocess.run([sys.executable, "-m", "vigild", "check", "--config", str(config)], capture_output=True,
                             text=True, env=daemon_env(), timeout=120)  # fmt: skip
    assert checked.returncode == 0 and "INSECURE" in checked.stdout, checked.stdout + checked.stderr


def test_the_console_over_tls(tmp_path):
    """`web.tls`: HTTPS with the given certificate (a CA the test makes); the cookie is then `Secure`."""
    import ssl

    from mqtt_broker import make_ca

    pki = make_ca(tmp_path / "pki", "console")
    web = f"  listen: 127.0.0.1:0\n  tls: {{cert: {pki['cert']}, key: {pki['key']}}}\n"
    config = config_for(tmp_path, f"  plaza:\n    source: {VTEST}\n    loop: true\n", web=web)
    service = Service(tmp_path, config)
    try:
        deadline = time.monotonic() + 120
        while not (found := re.search(r"web console: (https://[^/\s]+/)\?token=([A-Za-z0-9_-]+)", service.log_text())):
            assert service.process.poll() is None and time.monotonic() < deadline, service.log_text()[-2000:]
            time.sleep(0.2)
        url, token = found.group(1), found.group(2)
        host = url.split("//")[1].rstrip("/")
        context = ssl.create_default_context(cafile=str(pki["ca"]))

        def get(path: str, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
            connection = http.client.HTTPSConnection(host, timeout=30, context=context)
            connection.request("GET", path, headers=headers)
            response = connection.getresponse()
            response.read()
            connection.close()
            return response.status, {k.lower(): v for k, v in response.getheaders()}

        assert get("/api/v1/cameras", {})[0] == 401
        assert get("/api/v1/cameras", {"Authorization": f"Bearer {token}"})[0] == 200
        status, headers = get(f"/?token={token}", {})
        assert status == 303 and "Secure" in headers["set-cookie"] and "HttpOnly" in headers["set-cookie"]
        with pytest.raises(ssl.SSLError):  # a client that does not trust the console's CA
            http.client.HTTPSConnection(host, timeout=30, context=ssl.create_default_context()).request("GET", "/")
    finally:
        code, _ = service.stop()
    assert code == 0, service.log_text()[-3000:]


# ----- in a real browser


def chromium():
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.exists():
        pytest.fail("Debian's chromium is not installed: `make test` installs it (apt-get install chromium)")
    playwright = sync_playwright().start()
    browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=[
        "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"])  # fmt: skip
    return playwright, browser


def still_clip(tmp_path: Path) -> Path:
    """A still of the plaza (frame 100 of vtest.avi) as a 3 s clip: the same people in every frame, so the boxes
    the events give are where each frame's boxes are."""
    import cv2

    capture = cv2.VideoCapture(str(VTEST))
    capture.set(cv2.CAP_PROP_POS_FRAMES, 100)
    ok, image = capture.read()
    capture.release()
    assert ok
    return write_video([image] * 30, tmp_path / "still.avi", 10)


def test_in_chromium_the_grid_is_live_boxes_sit_on_the_detections_a_drawn_line_counts_and_survives_a_restart(tmp_path):
    """Debian's chromium, headless. With the token URL: the grid shows each camera's state; two screenshots of the
    plaza a second apart differ; on the still camera the drawn boxes' edges are green where the track.new events put
    the detections. In the editor a line drawn across the plaza with the mouse and saved makes line.cross events for
    it while the file plays (the camera not restarted), and is still there after the daemon restarts; a
    self-intersecting zone shows its error and changes nothing. The events page lists the journal's events for a
    filter and opens a snapshot."""
    still = still_clip(tmp_path)
    cameras = (f"  plaza:\n    source: {VTEST}\n    loop: true\n"
               f"  still:\n    source: {still}\n    loop: true\n")  # fmt: skip
    config = config_for(tmp_path, cameras)
    state = tmp_path / "state"
    service = Service(tmp_path, config, environ={"XDG_STATE_HOME": str(state)})
    playwright, browser = chromium()
    try:
        url, token = console(service)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.goto(f"{url}?token={token}")
        assert page.url == url  # the token went to a cookie
        for camera in ("plaza", "still"):
            page.wait_for_function(f"() => document.querySelector('section[data-camera={camera}] .state')?.textContent === 'streaming'", timeout=120_000)
        page.wait_for_function("() => document.querySelector('canvas[data-camera=plaza]')?.dataset.frame", timeout=60_000)
        tile = page.locator("canvas[data-camera=plaza]")
        first = tile.screenshot()
        time.sleep(1.0)
        assert tile.screenshot() != first, "the plaza is live"

        new = wait(lambda: journal_events(tmp_path, type="track.new", camera="still"), "tracks on the still", service)
        page.goto(f"{url}#/camera/still")
        canvas = page.locator("canvas[data-camera=still]")
        page.wait_for_function("() => JSON.parse(document.querySelector('canvas[data-camera=still]')?.dataset.boxes || '[]').length > 0", timeout=60_000)
        time.sleep(0.5)
        shown = page.evaluate("(() => { const c = document.querySelector('canvas[data-camera=still]'); const r = c.getBoundingClientRect(); return [r.width / c.width, r.x, r.y]; })()")
        shot = _png(canvas.screenshot())
        for event in new[:3]:
            x1, y1, x2, y2 = event["object"]["bbox"]
            k = shown[0]
            for x, y in (((x1 + x2) / 2, y1), ((x1 + x2) / 2, y2), (x1, (y1 + y2) / 2), (x2, (y1 + y2) / 2)):
                patch = shot[max(0, round(y * k) - 2) : round(y * k) + 3, max(0, round(x * k) - 2) : round(x * k) + 3]
                green = (patch[..., 1] > 180) & (patch[..., 0] < 110) & (patch[..., 2] < 110)
                assert green.any(), (event["object"], (x, y), patch[..., :3].tolist())

        page.goto(f"{url}#/editor/plaza")
        page.wait_for_selector("#editor-canvas")
        page.wait_for_timeout(500)
        editor = page.locator("#editor-canvas")
        box = editor.bounding_box()
        k = box["width"] / 768
        page.click("#tool-zone")
        for x, y in ((100, 100), (300, 300), (300, 100), (100, 300), (100, 100)):
            page.mouse.click(box["x"] + x * k, box["y"] + y * k)
        page.fill("#shape-name", "bowtie")
        page.dispatch_event("#shape-name", "change")
        page.click("#save")
        page.wait_for_selector("#errors li")
        error = page.inner_text("#errors")
        assert "cameras.plaza.zones." in error and "intersects itself" in error, error
        assert list(state.glob("vigild/*/edits.yaml")) == []
        page.click("#delete-shape")
        page.click("#tool-line")
        page.fill("#shape-name", "door")
        page.mouse.move(box["x"] + 384 * k, box["y"] + 60 * k)
        page.mouse.down()
        page.mouse.move(box["x"] + 384 * k, box["y"] + 300 * k, steps=5)
        page.mouse.move(box["x"] + 384 * k, box["y"] + 540 * k, steps=5)
        page.mouse.up()
        downs = len(journal_events(tmp_path, type="camera.down"))
        page.click("#save")
        page.wait_for_selector("#saved:has-text('Saved')", timeout=60_000)
        wait(lambda: journal_events(tmp_path, type="line.cross", line="door"), "a crossing of the drawn line", service)
        assert len(journal_events(tmp_path, type="camera.down")) == downs

        page.goto(f"{url}#/events")
        page.wait_for_selector("#filters")
        page.fill("input[name=type]", "line.cross")
        page.select_option("select[name=camera]", "plaza")
        before_filter = [e["seq"] for e in journal_events(tmp_path, type="line.cross", camera="plaza")]
        page.click("#filters button")
        page.wait_for_function("() => document.querySelectorAll('#events tbody tr').length > 0 && [...document.querySelectorAll('#events tbody tr')].every(r => r.children[2].textContent === 'line.cross')", timeout=30_000)
        shown_seqs = [int(s) for s in page.eval_on_selector_all("#events tbody tr", "rows => rows.map(r => r.dataset.seq)")]
        truth = [e["seq"] for e in journal_events(tmp_path, type="line.cross", camera="plaza")]
        assert shown_seqs[0] >= before_filter[-1]
        assert shown_seqs == sorted([s for s in truth if s <= shown_seqs[0]], reverse=True)[: len(shown_seqs)]
        page.click("#events tbody tr.has-snapshot")
        page.wait_for_function("() => document.querySelector('#snapshot')?.naturalWidth > 0", timeout=30_000)
        page.close()
    finally:
        browser.close()
        playwright.stop()
        code, _ = service.stop()
    assert code == 0, service.log_text()[-3000:]
    (tmp_path / "again").mkdir(mode=0o700)
    again = Service(tmp_path / "again", config, environ={"XDG_STATE_HOME": str(state)})
    try:
        url, token = console(again)
        status, geometry = api(url, token, "/api/v1/cameras/plaza/geometry")
        assert status == 200 and "door" in geometry["lines"] and geometry["lines"]["door"]["normalized"] is True
        x = [p[0] for p in geometry["lines"]["door"]["points"]]
        assert all(abs(v - 0.5) < 0.02 for v in x), geometry
    finally:
        again.stop()


def _png(data: bytes):
    import cv2
    import numpy as np

    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return image[..., ::-1]  # RGB


def test_the_wheel_ships_the_console_assets(tmp_path):
    """The assets are package data: read through importlib.resources, as an installed wheel serves them."""
    from vigild.web.server import static_files

    files = static_files()
    assert {"index.html", "app.js", "style.css"} <= set(files)
    assert b"<script" in files["index.html"][0] and b"onclick" not in files["index.html"][0]


def test_edits_merge_over_the_file_name_their_lines_and_warn_for_a_camera_gone(tmp_path):
    """The console's edits file: a `null` removes the file's entry, an edit replaces or adds one, `vigild check` names
    where each comes from; a problem inside an edit names the edits file and its line; an edit for a camera the
    config no longer has is a warning, not a refusal."""
    from vigild.config.edits import edits_path
    from vigild.config.loading import ConfigError, load_config

    config = config_for(tmp_path, f"  plaza:\n    source: {VTEST}\n{CROSSING}")
    state = tmp_path / "state"
    environ = daemon_env(XDG_STATE_HOME=str(state))
    edits = edits_path(config, environ)
    edits.parent.mkdir(parents=True)
    edits.write_text("cameras:\n  plaza:\n    lines:\n      crossing: null\n      door: {points: [[0.5, 0], [0.5, 1]], "
                     "normalized: true}\n  gone:\n    zones: {}\n")  # fmt: skip
    loaded = load_config(config, environ)
    assert set(loaded.cameras["plaza"].lines) == {"door"}
    assert loaded.edits.origins[("plaza", "lines", "door")] == f"{edits}:5"
    assert loaded.edits.warnings == [f"{edits}:6: cameras.gone: the config has no such camera any more; its edits "
                                     "are ignored"]  # fmt: skip
    assert set(load_config(config, environ, edits=False).cameras["plaza"].lines) == {"crossing"}
    edits.write_text("cameras:\n  plaza:\n    zones:\n      z:\n        points: [[0, 0], [1, 1], [1, 0], [0, 1]]\n"
                     "        normalized: true\n")  # fmt: skip
    with pytest.raises(ConfigError) as refused:
        load_config(config, environ)
    assert str(refused.value).startswith(f"{edits}:4: cameras.plaza.zones.z: ") and "intersects itself" in str(refused.value)
    checked = subprocess.run([sys.executable, "-m", "vigild", "check", "--config", str(config)], capture_output=True,
                             text=True, env=environ, timeout=120)  # fmt: skip
    assert checked.returncode == 2 and f"{edits}:4: cameras.plaza.zones.z" in checked.stderr, checked.stderr

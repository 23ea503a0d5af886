"""The web console's cost (issue 32): detection frames/s of the daemon with 4 viewers on 4 cameras against none,
alternating in one run, `--rounds` rounds each in a fresh process; medians and spread. A viewer is a light WebSocket
client (another process) that reads every live message of its camera: a browser on the same two cores would
measure the browser. Then, apart, Debian's chromium showing the grid of the 4 cameras: its CPU seconds per second.

    python bench/web.py [--seconds 30] [--warmup 15] [--rounds 3] [--cameras 4] [--skip-chromium]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import re
import statistics
import time
from typing import Any

from contenders import in_fresh_process, start_daemon, vtest_daemon_yaml
from journal import ANALYTICS, GEOMETRY, SHARED

WEB = "web:\n  listen: 127.0.0.1:0\n"


def viewers(url: str, token: str, cameras: list[str], seconds: float, results: Any) -> None:
    """(Another process.) One WebSocket per camera reading every message for `seconds`: messages and bytes."""
    import aiohttp

    async def view(session: aiohttp.ClientSession, camera: str, counts: dict[str, int]) -> None:
        async with session.ws_connect(f"{url}api/v1/cameras/{camera}/live") as socket:
            async for message in socket:
                counts["messages"] += 1
                counts["bytes"] += len(message.data)

    async def main() -> dict[str, int]:
        counts = {"messages": 0, "bytes": 0}
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session:
            tasks = [asyncio.ensure_future(view(session, camera, counts)) for camera in cameras]
            await asyncio.sleep(seconds)
            for task in tasks:
                task.cancel()
        return counts

    results.put(asyncio.run(main()))


def run_daemon(text: str, warmup: float, seconds: float, watched: bool, results: Any) -> None:
    """(In a fresh process.) The daemon of `text`; frames/s over `seconds` after `warmup`, with a viewer per camera
    (`watched`) or none; and what the viewers got."""
    daemon = start_daemon(text)
    daemon.start()
    watchers = None
    try:
        url = daemon.web.url
        from vigild.paths import state_dir

        token = (state_dir(daemon.config.file) / "web-token").read_text().strip()
        cameras = list(daemon.config.cameras)
        if watched:
            queue = multiprocessing.get_context("spawn").Queue()
            watchers = multiprocessing.get_context("spawn").Process(
                target=viewers, args=(url, token, cameras, warmup + seconds + 5, queue)
            )
            watchers.start()
        time.sleep(warmup)
        frames0 = sum(daemon.scheduler.processed.values())
        encoded0 = daemon.web.live.encoded
        began = time.monotonic()
        time.sleep(seconds)
        elapsed = time.monotonic() - began
        frames = sum(daemon.scheduler.processed.values()) - frames0
        encoded = daemon.web.live.encoded - encoded0
        got = queue.get(timeout=60) if watchers is not None else {}
    finally:
        daemon.stop()
        if watchers is not None:
            watchers.join(10)
    results.put({"fps": frames / elapsed, "encoded_s": encoded / elapsed, "viewers": got})


def chromium_cost(args: argparse.Namespace) -> None:
    """Debian's chromium showing the grid: CPU seconds it used per second of the window (all its processes)."""
    import psutil
    from playwright.sync_api import sync_playwright

    text = vtest_daemon_yaml(SHARED, args.cameras, ANALYTICS, args.device, camera_extra=GEOMETRY) + WEB
    daemon = start_daemon(text)
    daemon.start()
    try:
        from vigild.paths import state_dir

        token = (state_dir(daemon.config.file) / "web-token").read_text().strip()
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"])  # fmt: skip
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.goto(f"{daemon.web.url}?token={token}")
            time.sleep(args.warmup)
            browsers = [p for p in psutil.process_iter(["name", "cmdline"]) if re.search(r"chrom", p.info["name"] or "")]
            cpu0 = sum(sum(p.cpu_times()[:2]) for p in browsers if p.is_running())
            began = time.monotonic()
            time.sleep(args.seconds)
            cpu = sum(sum(p.cpu_times()[:2]) for p in browsers if p.is_running()) - cpu0
            elapsed = time.monotonic() - began
            browser.close()
    finally:
        daemon.stop()
    print(f"\nchromium showing the grid of {args.cameras} live cameras: {cpu / elapsed:.2f} CPU seconds per second "
          f"({cpu / elapsed / args.cameras:.2f} per live view)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=15.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cameras", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-chromium", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("YOLO_OFFLINE", "1")
    print(f"{args.cameras} looping vtest.avi (10 fps each, as fast as the chain takes them), Yolo-Fastest-XL 320 + "
          f"ByteTrack + analytics, {args.device}, web console on; {args.seconds:.0f} s windows")  # fmt: skip
    print(f"{'round':>5} {'viewers':>7} {'fps':>7} {'live/s':>7} {'got/s':>7} {'MB/s':>6}")
    fps: dict[bool, list[float]] = {True: [], False: []}
    for round_ in range(args.rounds):
        for watched in (False, True) if round_ % 2 == 0 else (True, False):
            text = vtest_daemon_yaml(SHARED, args.cameras, ANALYTICS, args.device, camera_extra=GEOMETRY) + WEB
            result = in_fresh_process(run_daemon, (text, args.warmup, args.seconds, watched),
                                      args.warmup + args.seconds + 600)  # fmt: skip
            fps[watched].append(result["fps"])
            got = result["viewers"]
            window = args.warmup + args.seconds + 5
            print(f"{round_:>5} {args.cameras if watched else 0:>7} {result['fps']:>7.1f} {result['encoded_s']:>7.1f} "
                  f"{got.get('messages', 0) / window:>7.1f} {got.get('bytes', 0) / window / 1e6:>6.2f}", flush=True)  # fmt: skip
    on, off = statistics.median(fps[True]), statistics.median(fps[False])
    print(f"detection frames/s, medians with {args.cameras} viewers / none: {on:.1f} ({min(fps[True]):.1f}-"
          f"{max(fps[True]):.1f}) / {off:.1f} ({min(fps[False]):.1f}-{max(fps[False]):.1f}) = {on / off:.3f}x")  # fmt: skip
    if not args.skip_chromium:
        chromium_cost(args)


if __name__ == "__main__":
    main()

"""What a subscriber that never reads costs the daemon: frames/s through the chain with and without one.

Side by side in one run, one `vigild run` per round (each a fresh process): one camera reading vtest.avi in a loop
as fast as the chain consumes it (`realtime: false`), and a plugin that publishes one event per frame (the test
suite's `frame_echo`, installed the way a third-party plugin is). Round `alone` has no subscriber; round `stuck`
has a subscriber in another process that connects and never reads, so ZeroMQ drops its messages at the high-water
mark. Frames/s is read from `vigild ctl status` over a window after a warm-up. The ratio stuck/alone is the figure
(1.0 means the stuck subscriber costs nothing); the test suite only checks what cannot be noise.

    python bench/stuck_subscriber.py [--seconds 10] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from service import Service, camera_yaml, free_endpoint, service_config  # noqa: E402

from vigild.service.control import ControlClient  # noqa: E402

STUCK = """
import sys, time, zmq
socket = zmq.Context().socket(zmq.SUB)
socket.setsockopt(zmq.SUBSCRIBE, b"")
socket.connect(sys.argv[1])
print("connected", flush=True)
time.sleep(3600)
"""


def processed(service: Service) -> int:
    with ControlClient(service.control_endpoint, timeout=30) as client:
        reply, _ = client.request("status")
    return int(reply["result"]["cameras"]["a"]["frames"])


def one_round(stuck: bool, seconds: float, vtest: Path) -> float:
    with tempfile.TemporaryDirectory(prefix="vigild-bench-") as folder:
        tmp = Path(folder)
        publisher = free_endpoint()
        config = service_config(tmp, camera_yaml("a", vtest, loop=True, realtime=False), publisher)
        subscriber = None
        if stuck:
            subscriber = subprocess.Popen([sys.executable, "-c", STUCK, publisher], stdout=-1, text=True)
            assert subscriber.stdout is not None and subscriber.stdout.readline().strip() == "connected"
        service = Service(tmp, config)
        try:
            deadline = time.monotonic() + 120
            while True:  # warm-up: running, and the stuck subscriber's buffers long full
                try:
                    if processed(service) > 2000:
                        break
                except TimeoutError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the daemon did not get going; log: {service.log_text()[-2000:]}")
                time.sleep(0.5)
            first, began = processed(service), time.monotonic()
            time.sleep(seconds)
            fps = (processed(service) - first) / (time.monotonic() - began)
            service.stop()
        finally:
            service.kill()
            if subscriber is not None:
                subscriber.kill()
                subscriber.wait()
    return fps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2, help="alternating alone/stuck pairs")
    parser.add_argument("--video", type=Path, default=ROOT.parent / "shared" / "media" / "vtest.avi")
    args = parser.parse_args()
    results: dict[str, list[float]] = {"alone": [], "stuck": []}
    for _ in range(args.rounds):
        for name in ("alone", "stuck"):
            results[name].append(round(one_round(name == "stuck", args.seconds, args.video), 1))
            print(f"{name}: {results[name][-1]} frames/s", file=sys.stderr)
    alone, stuck = (sum(v) / len(v) for v in (results["alone"], results["stuck"]))
    print(json.dumps({"frames_per_s": results, "ratio_stuck_to_alone": round(stuck / alone, 3)}, indent=2))


if __name__ == "__main__":
    main()

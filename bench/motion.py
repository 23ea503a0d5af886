"""Cameras per core with motion gating (issue 34), in one run:

1. **Cameras held, gating off against on.** Cameras of 640x360 H.264 at 10 frames/s, played at their rate and
   looping, each processed at `fps: 5`, through the fastest detector on this CPU (Yolo-Fastest 1.1 exported to ONNX
   with `vigild export`, ONNX Runtime fp32, 320x320; bench/motion.py --speed compares it with the others) and
   ByteTrack. The footage (tests/motion_scenes.py): the empty plaza with the real vtest footage cut in for 4 s of
   every 20 (a camera that sees walkers a fifth of the time), in 5 files whose walkers come at staggered phases (0,
   4, 8, 12, 16 s), cameras taking them in turn. For each camera count of the two ladders (`--ungated`,
   `--gated`), one daemon in a fresh process: `--warmup` s, then a `--window` s window of its status. Held: every
   camera had ≥ 95 % of its 5 frames/s through the gate (detected or gated: a moving frame that is neither was
   dropped) and capture drops ≤ 1 % of the frames taken at 5 frames/s. The two ladders alternate.
2. **What gating keeps** (the same footage, one camera, every frame, in this process through the chain and the
   gate as the scheduler runs them; not timed): track recall of gated against ungated detection (tracks ungated
   confirms that gated also confirms with IoU ≥ 0.5 on their middle frame), tracks each made, the largest delay of
   a mover's first `track.new` in processed frames, and the share of frames gated. Then `detect: regions` against
   `full` on the distant plaza (1280x720, walkers about 45 px tall): recall of each against the tracks of the
   footage at 640x480.
3. **Motion's own cost** per frame (`--cost`): the running average at 160 and 320 px wide against OpenCV's MOG2
   and KNN at the same sizes, on the footage at 640x360, one thread.

    python bench/motion.py [--ungated 16 20 24] [--gated 40 48 56] [--window 40] [--warmup 20] [--torch-threads 1]
                           [--speed] [--cost] [--skip-capacity] [--skip-accuracy]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

from contenders import in_fresh_process, start_daemon  # noqa: E402

SHARED = ROOT.parent / "shared"
FASTEST = SHARED / "models" / "yolo-fastest-1.1"
PHASES = (0.0, 4.0, 8.0, 12.0, 16.0)
FPS = 5
EXTRA = ""


def export(name: str, folder: Path) -> Path:
    """`vigild export` of a Yolo-Fastest model, as a user makes it."""
    config = folder / f"{name}.yaml"
    config.write_text(f"cameras:\n  a: {{source: test://ball}}\nplugins:\n  - type: detector\n"
                      f"    cfg: {FASTEST}/{name}.cfg\n    weights: {FASTEST}/{name}.weights\n"
                      f"    names: {FASTEST}/coco.names\n")  # fmt: skip
    out = folder / f"{name}.onnx"
    subprocess.run([sys.executable, "-m", "vigild", "export", "-c", str(config), "-o", str(out)], check=True,
                   capture_output=True)  # fmt: skip
    return out


def plugins_yaml(model: Path) -> str:
    return (f"  - type: detector\n    weights: {model}\n    names: {FASTEST}/coco.names\n    classes: [person]\n"
            f"    confidence: 0.3\n  - type: bytetrack\n    frame_rate: {FPS}\n")  # fmt: skip


def make_footage(folder: Path) -> list[Path]:
    from motion_scenes import quiet_scene, write_h264

    return [write_h264(quiet_scene(60, phase_s=phase), folder / f"quiet-{int(phase)}.mp4") for phase in PHASES]


def daemon_yaml(files: list[Path], cameras: int, gated: bool, model: Path, place: Path) -> str:
    sources = "".join(f"  cam{i}:\n    source: {files[i % len(files)]}\n    fps: {FPS}\n    loop: true\n"
                      for i in range(cameras))  # fmt: skip
    motion = "motion: {}\n" if gated else ""
    return (f"cameras:\n{sources}plugins:\n{plugins_yaml(model)}{motion}publisher:\n  endpoint: tcp://127.0.0.1:0\n"
            f"journal:\n  path: {place}/journal-{time.monotonic_ns()}.db\ncontrol:\n  enabled: false\n"
            f"device: cpu\nlog_level: WARNING\n{EXTRA}")  # fmt: skip


def run_trial(text: str, warmup: float, window: float, results: Any) -> None:
    """(In a fresh process.) The daemon of `text`: its cameras' counters over `window` s after `warmup` s."""
    import resource

    daemon = start_daemon(text)
    daemon.start()
    try:
        time.sleep(warmup)
        before, cpu0, began = daemon.status()["cameras"], _cpu(resource), time.monotonic()
        time.sleep(window)
        after, cpu1, elapsed = daemon.status()["cameras"], _cpu(resource), time.monotonic() - began
    finally:
        daemon.stop()
    cameras = {}
    for name, now in after.items():
        was = before[name]
        motion, motion0 = now.get("motion") or {}, was.get("motion") or {}
        detected = now["frames"] - was["frames"]
        gated = motion.get("gated", 0) - motion0.get("gated", 0)
        cameras[name] = {"taken": now["captured"] - was["captured"], "drops": now["drops"] - was["drops"],
                         "detected": detected, "gated": gated, "state": now["state"]}  # fmt: skip
    results.put({"cameras": cameras, "elapsed": elapsed, "cpu": (cpu1 - cpu0) / elapsed})


def _cpu(resource: Any) -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def held(trial: dict[str, Any]) -> tuple[bool, dict[str, float]]:
    """Whether every camera kept up, and the worst camera's figures."""
    elapsed = trial["elapsed"]
    through = [(c["detected"] + c["gated"]) / (FPS * elapsed) for c in trial["cameras"].values()]
    drops = [c["drops"] / max(1, c["drops"] + c["taken"]) for c in trial["cameras"].values()]
    detected = sum(c["detected"] for c in trial["cameras"].values()) / elapsed
    worst = {"through": min(through), "drops": max(drops), "detected_fps": detected, "cpu": trial["cpu"]}
    return min(through) >= 0.95 and max(drops) <= 0.01, worst


def capacity(args: argparse.Namespace, files: list[Path], model: Path, place: Path) -> None:
    print(f"\n## Cameras held (640x360 at 10 fps, fps: {FPS}, {args.window:g} s windows after {args.warmup:g} s)\n")
    print("| gating | cameras | held | worst camera's frames through / 5 fps | worst drops | detections/s | CPU |")
    print("|---|---|---|---|---|---|---|")
    ladders = [("off", n) for n in args.ungated], [("on", n) for n in args.gated]
    order = [item for pair in zip(*ladders, strict=False) for item in pair]
    order += ladders[0][len(ladders[1]):] + ladders[1][len(ladders[0]):]  # the longer ladder's rest
    best: dict[str, int] = {"off": 0, "on": 0}
    for gating, cameras in order:
        text = daemon_yaml(files, cameras, gating == "on", model, place)
        trial = in_fresh_process(run_trial, (text, args.warmup, args.window), timeout=args.warmup + args.window + 300)
        ok, worst = held(trial)
        if ok:
            best[gating] = max(best[gating], cameras)
        print(f"| {gating} | {cameras} | {'yes' if ok else 'no'} | {worst['through']:.3f} | {worst['drops']:.4f} | "
              f"{worst['detected_fps']:.1f} | {worst['cpu']:.2f} |", flush=True)  # fmt: skip
    ratio = best["on"] / best["off"] if best["off"] else float("nan")
    print(f"\nheld: {best['off']} cameras ungated, {best['on']} gated: {ratio:.2f}x (target >= 3x)")


def accuracy(model: Path, place: Path) -> None:
    from motion_scenes import distant_scene, footage, matched, quiet_scene, through_chain, to_distant

    chain = plugins_yaml(model)
    print("\n## What gating keeps (one camera, every frame through the gate and the chain)\n")
    print("| footage | tracks ungated | tracks gated | recall | gated tracks ungated has not | largest delay of a first "
          "track.new (frames) | gated |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    recalls = []
    rows = [(phase, "full") for phase in PHASES] + [(phase, "regions") for phase in PHASES[:2]]
    for phase, detect in rows:
        images = quiet_scene(60, phase_s=phase)[::2]
        truth = through_chain(images, chain, None, place)
        gated = through_chain(images, chain, {"detect": detect}, place)
        found = matched(truth.boxes, gated.boxes)
        recall = sum(v is not None for v in found.values()) / max(1, len(found))
        recalls.append(recall)
        first_truth, first_gated = truth.firsts(), gated.firsts()
        lag = max((first_gated[o] - first_truth[t] for t, o in found.items()
                   if o is not None and t in first_truth and o in first_gated), default=0)  # fmt: skip
        extra = sum(v is None for v in matched(gated.boxes, truth.boxes).values())
        print(f"| quiet plaza, phase {phase:g} s, `detect: {detect}` | {len(truth.boxes)} | {len(gated.boxes)} | {recall:.3f} | {extra} | "
              f"{lag} | {gated.counts['saved']:.1%} |", flush=True)  # fmt: skip
    print(f"\nrecall: median {statistics.median(recalls):.3f}, lowest {min(recalls):.3f} (crops per frame with "
          f"regions: {gated.counts['crops_per_frame']:.2f})")  # fmt: skip
    frames = 300
    truth_run = through_chain(list(footage((640, 480))[:frames]), chain, None, place)
    truth = {t: {k: to_distant(b, (640, 480)) for k, b in seen.items()}
             for t, seen in truth_run.boxes.items() if len(seen) >= 10}  # fmt: skip
    views = distant_scene(frames)
    print("\n| distant plaza (1280x720) | recall against the footage at 640x480 | tracks | crops per frame |")
    print("|---|---|---|---|")
    for detect in ("full", "regions"):
        run = through_chain(views, chain, {"detect": detect}, place)
        recall = sum(v is not None for v in matched(truth, run.boxes).values()) / max(1, len(truth))
        print(f"| `detect: {detect}` | {recall:.3f} ({len(truth)} tracks) | {len(run.boxes)} | "
              f"{run.counts['crops_per_frame']:.2f} |")  # fmt: skip


def cost() -> None:
    import cv2
    from motion_scenes import footage

    from vigild.config.motion import MotionConfig
    from vigild.vision.motion import MotionDetector

    cv2.setNumThreads(1)
    frames = footage((640, 360))
    print("\n## Motion's cost per 640x360 frame, one thread (ms; median of 3 rounds over the footage's 795 frames)\n")
    print("| small copy width | running average (vigild) | MOG2 | KNN |")
    print("|---|---|---|---|")
    for width in (160, 320):
        height = width * 9 // 16
        times: dict[str, list[float]] = {"average": [], "mog2": [], "knn": []}
        for _ in range(3):
            detector = MotionDetector(MotionConfig(width=width))
            began = time.perf_counter()
            for frame in frames:
                detector(frame)
            times["average"].append((time.perf_counter() - began) / len(frames) * 1000)
            for name, make in (("mog2", cv2.createBackgroundSubtractorMOG2), ("knn", cv2.createBackgroundSubtractorKNN)):
                subtractor = make()
                began = time.perf_counter()
                for frame in frames:
                    small = cv2.resize(frame, (width, height), interpolation=cv2.INTER_LINEAR)
                    moving = subtractor.apply(cv2.cvtColor(small, cv2.COLOR_BGR2GRAY))
                    cv2.connectedComponentsWithStats(moving)
                times[name].append((time.perf_counter() - began) / len(frames) * 1000)
        row = " | ".join(f"{statistics.median(v):.3f} ({min(v):.3f}-{max(v):.3f})" for v in times.values())
        print(f"| {width} | {row} |")


def speed(folder: Path) -> None:
    """The detectors on this CPU, model alone on 640x360 frames, batches of 1 and 4."""
    from motion_scenes import footage

    from vigild.plugins.detection.darknet import DarknetBackend, DarknetSpec
    from vigild.plugins.detection.onnx_runtime import onnx_backend

    images = list(footage((640, 360))[:48])
    print("\n## Detectors on this CPU (frames/s, the model alone, 640x360 frames at 320x320)\n")
    print("| model | runtime | batch 1 | batch 4 |")
    print("|---|---|---|---|")
    for name in ("yolo-fastest-1.1", "yolo-fastest-1.1-xl"):
        onnx = onnx_backend(export(name, folder), None, None, 0.3, 0.45, "cpu", 2, "polygon")
        spec = DarknetSpec(FASTEST / f"{name}.cfg", FASTEST / f"{name}.weights", FASTEST / "coco.names", (320, 320),
                           0.3, 0.45, "cpu", False)  # fmt: skip
        for runtime, backend in (("ONNX Runtime fp32", onnx), ("OpenCV DNN", DarknetBackend(spec))):
            rates = []
            for batch in (1, 4):
                backend.detect(images[:batch])
                began = time.perf_counter()
                for at in range(0, len(images), batch):
                    backend.detect(images[at : at + batch])
                rates.append(len(images) / (time.perf_counter() - began))
            print(f"| {name} | {runtime} | {rates[0]:.0f} | {rates[1]:.0f} |", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ungated", type=int, nargs="*", default=[16, 20, 24])
    parser.add_argument("--gated", type=int, nargs="*", default=[40, 48, 56])
    parser.add_argument("--window", type=float, default=40.0)
    parser.add_argument("--warmup", type=float, default=20.0)
    parser.add_argument("--skip-capacity", action="store_true")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--cost", action="store_true", help="motion's own cost per frame")
    parser.add_argument("--speed", action="store_true", help="the detectors on this CPU")
    parser.add_argument("--torch-threads", type=int, help="`torch_threads:` of both contenders' daemons")
    parser.add_argument("--workers", type=int, help="`capture.workers:` of both contenders' daemons")
    args = parser.parse_args()
    global EXTRA
    if args.torch_threads:
        EXTRA += f"torch_threads: {args.torch_threads}\n"
    if args.workers is not None:
        EXTRA += f"capture:\n  workers: {args.workers}\n"
    place = Path(tempfile.mkdtemp(prefix="vigild-bench-motion-"))
    model = export("yolo-fastest-1.1", place)
    if args.speed:
        speed(place)
    if args.cost:
        cost()
    if not args.skip_capacity:
        capacity(args, make_footage(place), model, place)
    if not args.skip_accuracy:
        accuracy(model, place)
    return 0


if __name__ == "__main__":
    sys.exit(main())

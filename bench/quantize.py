"""Detector back ends through the real daemon: OpenCV DNN, the darknet port (fp32, bf16), ONNX fp32 and ONNX INT8.

    python bench/quantize.py [--cameras 1 4] [--seconds 20] [--warmup 8] [--device cpu]

1. Quantizes the models with `vigild quantize` (vtest.avi as the camera: 300 calibration frames, 100 held back) and
   prints its agreement report; exports the fp32 ONNX models with `vigild export`.
2. Runs the daemon (`Daemon` in a fresh process per contender: cameras looping vtest.avi unpaced, the detector and
   ByteTrack, the journal off) for each back end at each camera count, and counts the frames its chain finished in
   the window. Contenders run one after the other in one run, so the ratios are side by side.

Yolo-Fastest-XL (real weights, 320x320): OpenCV DNN, the torch port in fp32 and bf16, ONNX fp32, ONNX INT8.
Target (issue 20): INT8 >= 1.5x OpenCV DNN at 4 cameras with F1 agreement >= 0.95 on held-back frames.
yolov8n (built from yolov8n.yaml: random weights, so its agreement means nothing, and none is claimed) at
640x384: ultralytics on torch, ONNX fp32 and ONNX INT8, beside the naive `track()` loop (bench/baselines.py) at 640.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from baselines import run_baseline  # noqa: E402
from contenders import contender_env, in_fresh_process, run_daemon  # noqa: E402

SHARED = ROOT.parent / "shared"
VTEST = SHARED / "media" / "vtest.avi"
FASTEST = SHARED / "models" / "yolo-fastest-1.1"


def darknet_yaml(runtime: str, half: bool) -> str:
    return (f"  - type: detector\n    id: people\n    cfg: {FASTEST}/yolo-fastest-1.1-xl.cfg\n"
            f"    weights: {FASTEST}/yolo-fastest-1.1-xl.weights\n    names: {FASTEST}/coco.names\n"
            f"    runtime: {runtime}\n    half: {str(half).lower()}\n    classes: [person]\n    confidence: 0.3\n")  # fmt: skip


def onnx_yaml(model: Path, people: bool) -> str:
    classes = "    classes: [person]\n" if people else ""
    return f"  - type: detector\n    id: people\n    weights: {model}\n{classes}    confidence: 0.3\n"


def ultralytics_yaml() -> str:
    return "  - type: detector\n    id: people\n    weights: yolov8n.yaml\n    input_size: [640, 384]\n    confidence: 0.3\n"


def daemon_yaml(detector: str, cameras: int, device: str) -> str:
    sources = "".join(f"  cam{i}:\n    source: {VTEST}\n    realtime: false\n    loop: true\n" for i in range(cameras))
    return (f"cameras:\n{sources}plugins:\n{detector}  - type: bytetrack\n"
            f"publisher:\n  endpoint: tcp://127.0.0.1:0\njournal:\n  enabled: false\ncontrol:\n  enabled: false\n"
            f"device: {device}\nlog_level: WARNING\n")  # fmt: skip


def cli(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "vigild", *args], env=contender_env(YOLO_OFFLINE="1"), cwd=ROOT,
                          capture_output=True, text=True, timeout=3600)  # fmt: skip
    if done.returncode:
        raise RuntimeError(f"vigild {args[0]} failed: {done.stderr[-2000:]}")
    return done.stdout


def models(work: Path) -> dict[str, Path]:
    """fp32 and INT8 ONNX models of both detectors, made by `vigild export` and `vigild quantize`."""
    out: dict[str, Path] = {}
    for name, detector in (("xl", darknet_yaml("torch", False)), ("v8n", ultralytics_yaml())):
        config = work / f"{name}.yaml"
        config.write_text(f"cameras:\n  door:\n    source: {VTEST}\nplugins:\n{detector}")
        out[f"{name}-fp32"] = work / f"{name}.onnx"
        cli("export", "--config", str(config), "--out", str(out[f"{name}-fp32"]))
        out[f"{name}-int8"] = work / f"{name}.int8.onnx"
        began = time.monotonic()
        report = cli("quantize", "--config", str(config), "--camera", "door", "--out", str(out[f"{name}-int8"]))
        print(f"\n`vigild quantize` of {name} ({time.monotonic() - began:.0f} s):\n{report}", flush=True)
        if name == "xl":
            overall = re.search(r"^  all .* ([\d.]+)$", report, re.MULTILINE)
            out["xl-f1"] = Path(overall[1] if overall else "nan")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cameras", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=8.0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vigild-bench-quantize-") as tmp:
        made = models(Path(tmp))
        contenders = {
            "xl opencv dnn": darknet_yaml("opencv", False),
            "xl torch fp32": darknet_yaml("torch", False),
            "xl torch bf16": darknet_yaml("torch", True),
            "xl onnx fp32": onnx_yaml(made["xl-fp32"], True),
            "xl onnx int8": onnx_yaml(made["xl-int8"], True),
            "v8n torch fp32": ultralytics_yaml(),
            "v8n onnx fp32": onnx_yaml(made["v8n-fp32"], False),
            "v8n onnx int8": onnx_yaml(made["v8n-int8"], False),
        }
        print(f"\ndaemon frames/s on {args.device} ({args.seconds:.0f} s windows after {args.warmup:.0f} s), "
              "detector + ByteTrack, vtest looping unpaced", flush=True)  # fmt: skip
        fps: dict[tuple[str, int], float] = {}
        for cameras in args.cameras:
            for name, detector in contenders.items():
                text = daemon_yaml(detector, cameras, args.device)
                result = in_fresh_process(run_daemon, (text, args.warmup, args.seconds), args.warmup + args.seconds + 600)
                fps[name, cameras] = result["fps"]
                base = fps["xl opencv dnn", cameras] if name.startswith("xl") else fps.get(("v8n torch fp32", cameras))
                ratio = f"{result['fps'] / base:.2f}x" if base else ""
                print(f"{cameras} camera(s)  {name:<16} {result['fps']:>7.1f} frames/s  {ratio:>6}", flush=True)
            naive = run_baseline("naive", [VTEST] * cameras, "yolov8n.yaml", 640, 0.3, args.device, args.seconds,
                                 args.warmup, timeout=args.seconds + args.warmup + 600)  # fmt: skip
            fps["v8n naive track()", cameras] = naive["fps"]
            print(f"{cameras} camera(s)  {'v8n naive track()':<16} {naive['fps']:>7.1f} frames/s", flush=True)
        top = max(args.cameras)
        int8 = fps["xl onnx int8", top] / fps["xl opencv dnn", top]
        print(f"\nYolo-Fastest-XL at {top} camera(s): ONNX INT8 / OpenCV DNN = {int8:.2f}x (target >= 1.5x); F1 "
              f"agreement of INT8 with fp32 on held-back frames {made['xl-f1']} (target >= 0.95)")  # fmt: skip
        print(f"yolov8n at {top} camera(s): ONNX INT8 / naive track() = "
              f"{fps['v8n onnx int8', top] / fps['v8n naive track()', top]:.2f}x (random weights: speed only)")


if __name__ == "__main__":
    main()

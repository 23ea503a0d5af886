"""`vigild export` and `vigild quantize` (docs/models.md): the detector's model tools, run by the command line.

They live beside the detector they serve; the command line (vigild.cli) only parses their arguments and imports
this module when one of them is asked for, so `vigild sub` and the others never load torch or ONNX Runtime.
Exit codes as the rest of the command line: 0 done, 2 wrong input (a camera, plugin or file the config does not
have, too few frames, a model that cannot be read), 1 anything else.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vigild.config.loading import Config, ConfigError, load_config
from vigild.plugin import PluginConfigError

EXIT_OK, EXIT_FAILURE, EXIT_INPUT = 0, 1, 2


def add_arguments(commands: argparse._SubParsersAction) -> None:
    export = commands.add_parser("export", help="write a detector's model as ONNX (docs/models.md#export)")
    export.add_argument("--config", "-c", required=True, help="YAML config file")
    export.add_argument("--plugin", help="the detector's id (default: the config's only detector)")
    export.add_argument("--camera", help="with this camera's settings (its overrides of input_size...)")
    export.add_argument("--out", "-o", required=True, help="the .onnx file to write")

    quantize = commands.add_parser(
        "quantize", help="an INT8 ONNX model calibrated on a camera's frames (docs/models.md#quantize)"
    )
    quantize.add_argument("--config", "-c", required=True, help="YAML config file")
    quantize.add_argument("--camera", required=True, help="the camera whose frames calibrate the model")
    quantize.add_argument("--plugin", help="the detector's id (default: the config's only detector)")
    quantize.add_argument("--frames", type=int, default=300, help="frames to calibrate on (default 300)")
    quantize.add_argument(
        "--holdout", type=int, default=100, help="frames after those, held back to measure agreement (default 100)"
    )
    quantize.add_argument("--threads", type=int, help="ONNX Runtime's threads (default: one per usable CPU)")
    quantize.add_argument("--out", "-o", required=True, help="the .onnx file to write, e.g. model.int8.onnx")


def run(args: argparse.Namespace) -> int:
    from vigild.plugins.detection.export import ExportError
    from vigild.plugins.detection.quantize import QuantizeError

    name = f"vigild {args.command}"
    out = Path(args.out)
    if not out.parent.is_dir():
        print(f"{name}: --out {out}: no such directory {out.parent}", file=sys.stderr)
        return EXIT_INPUT
    try:
        config = load_config(args.config)
        if args.command == "export":
            return _export(config, args, out)
        return _quantize(config, args, out)
    except ConfigError as exc:
        print(f"{name}: config error: {exc}", file=sys.stderr)
    except PluginConfigError as exc:  # a model file the detector cannot take: names the file and why
        print(f"{name}: {exc.key}: {exc}", file=sys.stderr)
    except (QuantizeError, ExportError) as exc:
        print(f"{name}: {exc}", file=sys.stderr)
    return EXIT_INPUT


def _export(config: Config, args: argparse.Namespace, out: Path) -> int:
    from vigild.plugins.detection.export import export_onnx, exportable
    from vigild.plugins.detection.quantize import choose_detector

    chosen = choose_detector(config, args.camera, args.plugin)
    model = exportable(chosen.config)
    export_onnx(model, out)
    width, height = model.input_size
    print(f"wrote {out}: detector '{chosen.plugin}' ({model.task}, {len(model.class_names)} classes, input "
          f"{width}x{height}, {model.resize}, batch axis dynamic)")  # fmt: skip
    return EXIT_OK


def _quantize(config: Config, args: argparse.Namespace, out: Path) -> int:
    from vigild.plugins.detection.quantize import quantize
    from vigild.service.threads import process_cpus

    report = quantize(config, args.camera, args.plugin, out, args.frames, args.holdout, args.threads or process_cpus())
    print("\n".join(report.lines()))
    return EXIT_OK

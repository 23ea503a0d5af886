"""`vigild export` and `vigild quantize` (docs/models.md): the detector's model tools, run by the command line.

They live beside the detector they serve; the command line (vigild.cli) only parses their arguments and imports
this module when one of them is asked for, so `vigild sub` and the others never load torch or ONNX Runtime.
Exit codes as the rest of the command line: 0 done, 2 wrong input (a camera, plugin or file the config does not
have, too few frames, a model that cannot be read), 1 anything else.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vigild.cli_args import integer
from vigild.config.loading import Config, ConfigError, load_config
from vigild.config.sources import SourceKind
from vigild.plugin import PluginConfigError

EXIT_OK, EXIT_FAILURE, EXIT_INPUT = 0, 1, 2
MAX_FRAMES = 100_000
"""`--frames` and `--holdout` at most: each frame is held in memory, decoded."""
MAX_THREADS = 1024


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
    quantize.add_argument(
        "--frames", type=integer(1, MAX_FRAMES), default=300, help="frames to calibrate on (default 300)"
    )
    quantize.add_argument(
        "--holdout",
        type=integer(1, MAX_FRAMES),
        default=100,
        help="frames after those, held back to measure agreement (default 100)",
    )
    quantize.add_argument(
        "--threads", type=integer(1, MAX_THREADS), help="ONNX Runtime's threads (default: one per usable CPU)"
    )
    quantize.add_argument("--out", "-o", required=True, help="the .onnx file to write, e.g. model.int8.onnx")


def run(args: argparse.Namespace) -> int:
    from vigild.plugins.detection.export import ExportError
    from vigild.plugins.detection.quantize import QuantizeError

    name = f"vigild {args.command}"
    out = Path(args.out)
    if not out.parent.is_dir():
        print(f"{name}: --out {out}: no such directory {out.parent}", file=sys.stderr)
        return EXIT_INPUT
    if out.is_dir():
        print(f"{name}: --out {out}: is a directory: name the .onnx file to write", file=sys.stderr)
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
    _refuse_an_input(out, _inputs(config, chosen.config))
    model = exportable(chosen.config)
    with replaced(out) as partial:
        export_onnx(model, partial)
    width, height = model.input_size
    print(f"wrote {out}: detector '{chosen.plugin}' ({model.task}, {len(model.class_names)} classes, input "
          f"{width}x{height}, {model.resize}, batch axis dynamic)")  # fmt: skip
    return EXIT_OK


def _quantize(config: Config, args: argparse.Namespace, out: Path) -> int:
    from vigild.cpus import process_cpus
    from vigild.plugins.detection.quantize import choose_detector, quantize

    chosen = choose_detector(config, args.camera, args.plugin)
    source = config.source(args.camera)
    camera_file = [Path(source.uri)] if source.kind is SourceKind.FILE else []
    _refuse_an_input(out, [*_inputs(config, chosen.config), *camera_file])
    with replaced(out) as partial:
        threads = args.threads or process_cpus()
        report = quantize(config, args.camera, args.plugin, partial, args.frames, args.holdout, threads)
    print("\n".join(dataclasses.replace(report, out=out).lines()))
    return EXIT_OK


def _inputs(config: Config, detector: Any) -> list[Path]:
    """The files the tool reads: the config file and the detector's model files."""
    return [config.file, *(Path(file) for file in (detector.weights, detector.cfg, detector.names) if file)]


def _refuse_an_input(out: Path, inputs: list[Path]) -> None:
    """`--out` must not be a file the tool reads (by name, or through a symlink or a hard link): the model would be
    replaced by what was made from it."""
    from vigild.plugins.detection.quantize import QuantizeError

    for file in inputs:
        try:
            same = os.path.samefile(out, file)
        except OSError:  # one of them is not there: the same only by name
            same = out.resolve() == file.resolve()
        if same:
            raise QuantizeError(f"--out {out} is {file}, which this command reads: write to another file")


@contextmanager
def replaced(out: Path) -> Iterator[Path]:
    """A new file in `out`'s directory to write, renamed over `out` once the block succeeds (else removed): `out`
    is whole or as it was, and a symlink at `out` is replaced, never written through."""
    fd, name = tempfile.mkstemp(prefix=f".{out.stem}-", suffix=".partial.onnx", dir=out.parent)
    os.close(fd)
    partial = Path(name)
    try:
        yield partial
        umask = os.umask(0o077)
        os.umask(umask)
        partial.chmod(0o666 & ~umask)  # as a file made with open(): mkstemp's are the owner's only
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)

"""`vigild run | check | sub`. Exit codes: 0 success, 2 a config the daemon refuses, 1 anything else."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence

from vigild import __version__
from vigild.chain import PluginStartError
from vigild.client import DEFAULT_ENDPOINT, Subscriber
from vigild.config import Config, ConfigError, load_config
from vigild.gst_pipeline import resolve_backend
from vigild.plugin import PluginConfigError

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2

log = logging.getLogger("vigild")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vigild", description="Real-time video analytics daemon.")
    parser.add_argument("--version", action="version", version=f"vigild {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the daemon until SIGINT/SIGTERM (or until every file camera ends)")
    run.add_argument("--config", "-c", required=True, help="YAML config file")
    run.add_argument(
        "--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="override the config's log_level"
    )

    check = commands.add_parser("check", help="validate a config file (and import its plugins); exit 0 or 2")
    check.add_argument("--config", "-c", required=True, help="YAML config file")

    sub = commands.add_parser("sub", help="print events as JSON lines")
    sub.add_argument(
        "--endpoint", "-e", default=DEFAULT_ENDPOINT, help=f"publisher endpoint (default {DEFAULT_ENDPOINT})"
    )
    sub.add_argument("--count", "-n", type=int, help="exit after this many messages")
    sub.add_argument(
        "--timeout", "-t", type=float, help="exit after this many seconds without a message (exit 1 if none came)"
    )
    sub.add_argument("--topics", action="store_true", help="print each topic before its JSON, separated by a space")
    sub.add_argument(
        "prefixes",
        nargs="*",
        default=["vigild."],
        metavar="TOPIC_PREFIX",
        help="e.g. vigild.door. (default: everything)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "sub":
        return _sub(args)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"vigild: config error: {str(exc).replace(chr(10), chr(10) + 'vigild: config error: ')}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "check":
        plugins = ", ".join(f"{spec.id} ({spec.config.type})" for spec in config.chain) or "none"
        print(f"{config.file}: ok: {len(config.cameras)} camera(s) [{', '.join(config.cameras)}], plugins: {plugins}")
        for name, camera in config.cameras.items():
            source = config.source(name)
            print(f"  {name}: {source.kind.value} {source.display} via {resolve_backend(camera.backend)}")
        return EXIT_OK
    return _run(config, args.log_level or config.settings.log_level)


def _run(config: Config, log_level: str) -> int:
    from vigild.daemon import Daemon
    from vigild.publisher import PublisherError

    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        daemon = Daemon(config)
    except PluginStartError as exc:
        return _refuse_plugin(config, exc)

    def on_signal(signum: int, _frame: object) -> None:
        if daemon.wait(0):
            log.warning("received %s again: exiting without a clean stop", signal.Signals(signum).name)
            os._exit(EXIT_FAILURE)
        log.info("received %s, stopping", signal.Signals(signum).name)
        daemon.request_stop()

    signal.signal(signal.SIGTERM, on_signal)  # before start: a stop asked for while models load is kept
    signal.signal(signal.SIGINT, on_signal)
    try:
        daemon.start()
    except PluginStartError as exc:
        return _refuse_plugin(config, exc)
    except PublisherError as exc:
        print(f"vigild: config error: {config.error(('publisher', 'endpoint'), str(exc))}", file=sys.stderr)
        return EXIT_CONFIG

    while not daemon.wait(0.5):  # a timed wait keeps the main thread responsive to signals
        pass
    daemon.stop()
    return EXIT_OK


def _refuse_plugin(config: Config, exc: PluginStartError) -> int:
    cause = exc.cause
    if isinstance(cause, PluginConfigError):
        error = config.error(("plugins", exc.position, cause.key), str(cause))
    else:
        error = config.error(("plugins", exc.position), f"failed to start: {type(cause).__name__}: {cause}")
    print(f"vigild: config error: {error}", file=sys.stderr)
    return EXIT_CONFIG


def _sub(args: argparse.Namespace) -> int:
    received = 0
    with Subscriber(args.endpoint, args.prefixes) as subscriber:
        try:
            while args.count is None or received < args.count:
                message = subscriber.receive(timeout=args.timeout)
                if message is None:
                    break
                line = json.dumps(message.event, separators=(",", ":"))
                print(f"{message.topic} {line}" if args.topics else line, flush=True)
                received += 1
        except KeyboardInterrupt:
            pass
        except BrokenPipeError:  # `vigild sub | head` closes our stdout: that is a normal end
            sys.stderr.close()
    return EXIT_OK if received or args.timeout is None else EXIT_FAILURE

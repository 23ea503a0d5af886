"""`vigild run | check | sub | ctl | events | clip | keygen | export | quantize`. Exit codes: 0 success, 2 a config the daemon refuses, 1 anything else."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from vigild import __version__, cli_clients
from vigild.cli_args import integer, seconds
from vigild.cli_clients import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK
from vigild.client import DEFAULT_ENDPOINT
from vigild.config.loading import Config, ConfigError, load_config
from vigild.config.motion import mask_warnings
from vigild.cpus import prefer_passive_waits
from vigild.curve import ClientKeys, keygen
from vigild.pipeline.chain import PluginStartError
from vigild.plugin import PluginConfigError

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
    sub.add_argument("--count", "-n", type=integer(1), help="exit after this many messages")
    sub.add_argument(
        "--timeout", "-t", type=seconds, help="exit after this many seconds without a message (exit 1 if none came)"
    )
    sub.add_argument("--topics", action="store_true", help="print each topic before its JSON, separated by a space")
    sub.add_argument(
        "--resume",
        action="store_true",
        help="fill every gap in seq from the daemon's journal: each event once, in order; what the journal lacks "
        "is printed as a gap notice (docs/events.md#resume)",
    )
    sub.add_argument("--after-seq", type=integer(0), help="with --resume: start after this seq (0: the whole journal)")
    sub.add_argument("--replay-endpoint", help="with --resume: the replay socket (default: the daemon's default)")
    _curve_arguments(sub)
    sub.add_argument(
        "prefixes",
        nargs="*",
        default=["vigild."],
        metavar="TOPIC_PREFIX",
        help="e.g. vigild.door. (default: everything)",
    )

    ctl = commands.add_parser("ctl", help="send a command to a running daemon's control socket")
    ctl.add_argument("--endpoint", "-e", help="control endpoint (default: the daemon's default ipc:// socket)")
    ctl.add_argument("--config", "-c", help="take the endpoint from this config file")
    ctl.add_argument("--timeout", "-t", type=seconds, default=30.0, help="seconds to wait for the reply")
    _curve_arguments(ctl)
    actions = ctl.add_subparsers(dest="action", required=True)
    actions.add_parser("status", help="the daemon's state, as JSON")
    cameras = actions.add_parser("cameras", help="list, add, update or remove cameras (until the next reload)")
    cameras.add_argument("verb", nargs="?", default="list", choices=["list", "add", "update", "remove"])
    cameras.add_argument("name", nargs="?")
    cameras.add_argument(
        "settings", nargs="?", help='the camera\'s settings as JSON, e.g. \'{"source": "rtsp://..."}\''
    )
    actions.add_parser("reload", help="re-read the config file and apply the difference")
    snapshot = actions.add_parser("snapshot", help="the camera's latest frame as a JPEG")
    snapshot.add_argument("camera")
    snapshot.add_argument("--output", "-o", default="-", help="file to write (default: standard output)")
    for name in ("pause", "resume"):
        actions.add_parser(name, help=f"{name} capturing a camera").add_argument("camera")

    events = commands.add_parser("events", help="print the event journal's history (docs/events.md#history)")
    where = events.add_mutually_exclusive_group(required=True)
    where.add_argument("--journal", "-j", help="the journal's database file")
    where.add_argument("--config", "-c", help="the daemon's config file: its journal (and, to follow, its sockets)")
    events.add_argument("--camera", help="only this camera's events")
    events.add_argument("--type", dest="type_prefix", help="a type, or a prefix such as zone.")
    events.add_argument("--since", help="ISO 8601 (UTC unless it says) or a duration before now: 15m, 2h, 1d")
    events.add_argument("--until", help="as --since; events before it")
    events.add_argument("--track", type=integer(0), help="only this track id's events")
    events.add_argument("--label", help="only events about objects of this label")
    events.add_argument("--after-seq", type=integer(0), help="only events after this seq")
    events.add_argument("--limit", type=integer(0), help="at most this many (the first, in seq order)")
    events.add_argument("--format", choices=["json", "csv", "table"], default="json", help="default: JSON lines")
    events.add_argument("--count-by", help="count the events per value of these fields instead, e.g. camera,type")
    events.add_argument(
        "--follow",
        "-f",
        action="store_true",
        help="after the history, print the live events as they come: no gap, no duplicate (JSON lines)",
    )
    events.add_argument("--endpoint", "-e", help="--follow: the publisher (default: the config's, else the default)")
    events.add_argument(
        "--replay-endpoint", help="--follow: the replay socket (default: the config's, else the daemon's default)"
    )
    _curve_arguments(events)

    clip = commands.add_parser("clip", help="copy out the recorded clip of an event (docs/recording.md)")
    clip.add_argument("event", help="the event's id (32 hex digits) or its seq")
    source = clip.add_mutually_exclusive_group(required=True)
    source.add_argument("--journal", "-j", help="the journal's database file")
    source.add_argument("--config", "-c", help="the daemon's config file: its journal")
    clip.add_argument("--output", "-o", required=True, help="where to write the MP4 (`-`: standard output)")

    cluster = commands.add_parser("cluster", help="who holds which camera in a cluster (docs/cluster.md)")
    cluster_actions = cluster.add_subparsers(dest="action", required=True)
    status = cluster_actions.add_parser("status", help="the members and leases, read from NATS")
    status.add_argument("--json", action="store_true", help="as JSON")
    ready = cluster_actions.add_parser("ready", help="exit 0 once this host's daemon registered and streams what it "
                                       "holds (a readiness probe)")  # fmt: skip
    ready.add_argument("--timeout", "-t", type=seconds, default=5.0, help="seconds to wait for the daemon")
    for command in (status, ready):
        command.add_argument("--config", "-c", required=True, help="the daemon's config file")
        _curve_arguments(command)

    keygen = commands.add_parser("keygen", help="make a CURVE key pair (NAME.key public, NAME.key_secret private)")
    keygen.add_argument("name", help="e.g. server, or a client's name")
    keygen.add_argument("--dir", "-d", default=".", help="where to write the two files")

    from vigild.plugins.detection import commands as model_tools  # argparse only: torch is imported when run

    model_tools.add_arguments(commands)
    return parser


def _curve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server-key", help="CURVE: the daemon's public key file (server.key)")
    parser.add_argument("--key", help="CURVE: this client's secret key file (NAME.key_secret)")


def _client_keys(args: argparse.Namespace) -> ClientKeys | None:
    if bool(args.server_key) != bool(args.key):
        raise ValueError("CURVE needs both --server-key and --key")
    return ClientKeys.load(args.server_key, args.key) if args.server_key else None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in ("sub", "ctl", "events", "cluster"):
        try:
            keys = _client_keys(args)
        except (OSError, ValueError) as exc:
            print(f"vigild {args.command}: CURVE keys: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        return {"sub": cli_clients.sub, "ctl": cli_clients.ctl, "events": cli_clients.events,
                "cluster": cli_clients.cluster}[args.command](args, keys)  # fmt: skip
    if args.command == "clip":
        return cli_clients.clip(args)
    prefer_passive_waits()  # the commands below load torch
    if args.command in ("export", "quantize"):
        from vigild.plugins.detection import commands as model_tools

        return model_tools.run(args)
    if args.command == "keygen":
        try:
            public, secret = keygen(Path(args.dir), args.name)
        except OSError as exc:  # an existing pair is never replaced; a missing or read-only directory
            print(f"vigild keygen: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        print(f"public key (give it out): {public}\nsecret key (keep it private): {secret}")
        return EXIT_OK
    try:
        config = load_config(args.config)
        backends = config.backends()  # this machine's: loading checked values only
    except ConfigError as exc:
        print(f"vigild: config error: {str(exc).replace(chr(10), chr(10) + 'vigild: config error: ')}", file=sys.stderr)
        return EXIT_CONFIG
    except (
        Exception
    ) as exc:  # a plugin's config model with a bug (pydantic passes on all but ValueError, AssertionError)
        print(f"vigild: config error: {args.config}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "check":
        plugins = ", ".join(f"{spec.id} ({spec.config.type})" for spec in config.chain) or "none"
        print(f"{config.file}: ok: {len(config.cameras)} camera(s) [{', '.join(config.cameras)}], plugins: {plugins}")
        for name in config.cameras:
            source = config.source(name)
            print(f"  {name}: {source.kind.value} {source.display} via {backends[name]}")
            for kind in ("zones", "lines"):  # merged with the web console's edits: where each one comes from
                for entry in getattr(config.cameras[name], kind):
                    print(f"    {kind[:-1]} {entry}: {config.edits.origins.get((name, kind, entry), config.file)}")
            recording = config.settings.camera_recording(name)
            if recording is not None:
                triggers = ", ".join(t.type + "".join(f" {k}={v}" for k, v in t.model_dump(exclude_none=True).items()
                                                      if k != "type") for t in recording.events) or "none"  # fmt: skip
                continuous = (f", continuous {recording.continuous.segment_s:g} s segments kept "
                              f"{recording.continuous.retain_days:g} d") if recording.continuous else ""  # fmt: skip
                print(f"    recording: clips on {triggers} ({recording.pre_s:g} s before, {recording.post_s:g} s "
                      f"after, at most {recording.max_s:g} s, kept {recording.retain_days:g} d){continuous}")  # fmt: skip
            motion = config.settings.camera_motion(name)
            if motion is not None:
                print(f"    motion: threshold {motion.threshold}, min area {motion.min_area:g} px, "
                      f"{len(motion.masks)} mask(s), detect {motion.detect}, still tracks detected every "
                      f"{motion.stationary_interval_s:g} s")  # fmt: skip
                resize = config.cameras[name].resize
                for warning in mask_warnings(motion, *resize) if resize is not None else []:
                    print(f"  warning: camera {name}: {warning}")
        for warning in config.edits.warnings:
            print(f"  warning: {warning}")
        if config.edits.file is not None:
            print(f"  edits: {config.edits.file} (the web console's zones and lines, merged over the file)")
        if config.settings.web is not None:
            web = config.settings.web
            scheme = "https" if web.tls is not None else "http"
            print(f"  web console: {scheme}://{web.listen}/" + (" (INSECURE: no TLS beyond loopback)"
                                                              if web.insecure and not web.loopback else ""))  # fmt: skip
        journal = config.settings.journal
        if journal.enabled:
            from vigild.outputs.journal import default_path
            from vigild.paths import replay_endpoint

            replay = journal.replay_endpoint or replay_endpoint(config.file)
            print(f"  journal: {journal.path or default_path(config.file)} (replay on {replay})")
        else:
            print("  journal: off")
        for output in config.settings.outputs:
            print(f"  output {output.name}: {output.describe()}")
        if config.settings.cluster is not None:
            print(f"  {config.settings.cluster.describe()}")
        if any(config.settings.camera_recording(name) is not None for name in config.cameras):
            from vigild.config.recording import recordings_root
            from vigild.outputs.journal import default_path as journal_path

            section = config.settings.recording
            root = recordings_root(section, journal.path or journal_path(config.file))
            cap = section.max_size_mb if section is not None else 20480
            print(f"  recordings: {root} (at most {cap:g} MB)")
        return EXIT_OK
    return _run(config, args.log_level)


def _run(config: Config, log_level: str | None) -> int:
    """`log_level`: from the command line; it then outlasts every reload and camera change."""
    from vigild.service.daemon import BindError, Daemon
    from vigild.service.errors import CommandError

    logging.basicConfig(
        level=log_level or config.settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from vigild.service.workers import WorkersVariableError

    try:
        daemon = Daemon(config, log_level_override=log_level)
    except PluginStartError as exc:
        return _refuse_plugin(config, exc)
    except WorkersVariableError as exc:
        print(f"vigild: environment error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    reload_requested = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        if daemon.wait(0):
            log.warning("received %s again: exiting without a clean stop", signal.Signals(signum).name)
            os._exit(EXIT_FAILURE)
        log.info("received %s, stopping", signal.Signals(signum).name)
        daemon.request_stop()

    def on_hangup(_signum: int, _frame: object) -> None:
        reload_requested.set()  # the reload itself runs on the main thread, below

    signal.signal(signal.SIGTERM, on_signal)  # before start: a stop asked for while models load is kept
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_hangup)
    try:
        daemon.start()
    except PluginStartError as exc:
        return _refuse_plugin(config, exc)
    except BindError as exc:
        print(f"vigild: config error: {config.error(exc.key, str(exc))}", file=sys.stderr)
        return EXIT_CONFIG

    while not daemon.wait(0.5):  # a timed wait keeps the main thread responsive to signals
        if reload_requested.is_set():
            reload_requested.clear()
            try:
                daemon.reload()
            except (ConfigError, CommandError):
                pass  # Daemon.reload logged why, once
            except PluginStartError as exc:
                log.error("reload failed, still running the previous config: %s", exc)
            except Exception as exc:  # (a plugin's validator, a bug): a reload must never end the daemon
                log.error(
                    "reload failed, still running the previous config: %s: %s: %s",
                    config.file,
                    type(exc).__name__,
                    exc,
                    exc_info=log.isEnabledFor(logging.DEBUG),
                )
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

"""The client commands of `vigild`: `ctl`, `events` and `sub` (argument parsing and dispatch: vigild.cli). They
import neither torch nor OpenCV nor GStreamer: a client starts fast on a machine without a GPU stack."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from vigild.client import DEFAULT_ENDPOINT, ControlClient, Subscriber
from vigild.config.loading import ConfigError, load_control_settings
from vigild.curve import ClientKeys

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2


def ctl(args: argparse.Namespace, keys: ClientKeys | None) -> int:
    endpoint = args.endpoint
    if args.config and not endpoint:
        try:
            from vigild.paths import control_endpoint  # unset: the default socket of that config's daemon

            endpoint = load_control_settings(args.config).endpoint or control_endpoint(args.config)
        except ConfigError as exc:
            print(f"vigild: config error: {exc}", file=sys.stderr)
            return EXIT_CONFIG
    arguments: dict[str, object] = {}
    action = args.action
    if action == "cameras":
        arguments["action"] = args.verb
        if args.verb != "list":
            if not args.name:
                print(f"vigild ctl cameras {args.verb}: give the camera's name", file=sys.stderr)
                return EXIT_FAILURE
            arguments["camera"] = args.name
        if args.verb in ("add", "update"):
            try:
                arguments["config"] = json.loads(args.settings or "")
            except ValueError as exc:
                print(f"vigild ctl cameras {args.verb}: settings must be JSON: {exc}", file=sys.stderr)
                return EXIT_FAILURE
    elif action in ("snapshot", "pause", "resume"):
        arguments["camera"] = args.camera
    with ControlClient(endpoint, keys, args.timeout) as client:
        try:
            reply, attachment = client.request(action, **arguments)
        except TimeoutError as exc:
            print(f"vigild ctl: {exc}", file=sys.stderr)
            return EXIT_FAILURE
    if not reply.get("ok"):
        error = reply.get("error", {})
        print(f"vigild ctl: {error.get('code')}: {error.get('message')}", file=sys.stderr)
        return EXIT_FAILURE
    if action == "snapshot" and attachment is not None:
        if args.output == "-":
            sys.stdout.buffer.write(attachment)
        else:
            Path(args.output).write_bytes(attachment)
            print(json.dumps(reply["result"]))
        return EXIT_OK
    print(json.dumps(reply["result"], indent=2))
    return EXIT_OK


def events(args: argparse.Namespace, keys: ClientKeys | None) -> int:
    """`vigild events`: history from the journal (sqlite3 only: no torch, OpenCV nor GStreamer); with `--follow`,
    then the live events through a resuming subscriber."""
    from vigild.outputs import history
    from vigild.outputs.journal import Query

    try:
        query = Query(
            camera=args.camera,
            type_prefix=args.type_prefix,
            since=history.parse_time(args.since, option="--since") if args.since else None,
            until=history.parse_time(args.until, option="--until") if args.until else None,
            track=args.track,
            label=args.label,
            after_seq=args.after_seq,
            limit=args.limit,
        )
        fields = history.count_fields(args.count_by) if args.count_by else None
        if args.follow and (fields is not None or args.format != "json"):
            raise history.HistoryError("--follow prints JSON lines: not with --count-by or --format")
        path, endpoint, replay = journal_of(args)
        db = history.open_journal(path)
    except history.HistoryError as exc:
        print(f"vigild events: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except ConfigError as exc:
        print(f"vigild events: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        if fields is not None:
            history.write_counts(history.counts(db, query, fields), args.format)
        elif not args.follow and args.format == "json":
            # as stored, no parsing; an event with a clip gets `clip` added (docs/recording.md)
            sys.stdout.writelines(body + "\n" for body in history.with_clips(db, history.select_text(db, query)))
        elif not args.follow:
            history.write(history.select(db, query), args.format)
        else:
            last = history.last_seq(db)  # the history up to here, then the journal and the live stream after it
            printed = history.write((event for event in history.select(db, query) if event["seq"] <= last), args.format)
            sys.stdout.flush()
            db.close()
            follow(query, endpoint, replay, keys, last, printed)
    except BrokenPipeError:  # `| head`: the reader has what it wanted
        sys.stderr.close()
        return EXIT_OK
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        db.close()
    return EXIT_OK


def clip(args: argparse.Namespace) -> int:
    """`vigild clip EVENT -o FILE`: the clip an event started or extended, copied out as it is stored."""
    import shutil

    from vigild.outputs import history
    from vigild.outputs.clip_store import clip_of_event, export_relative, has_clip_tables, segments_between

    text = args.event.strip().lower()
    event: str | int = int(text) if text.isdigit() else text
    if not text.isdigit() and not (len(text) == 32 and all(c in "0123456789abcdef" for c in text)):
        print(f"vigild clip: {args.event!r} is neither an event id (32 hex digits) nor a seq", file=sys.stderr)
        return EXIT_CONFIG
    try:
        path, _, _ = journal_of(args)
        db = history.open_journal(path)
    except (history.HistoryError, ConfigError) as exc:
        print(f"vigild clip: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        column = "seq" if isinstance(event, int) else "id"
        if db.execute(f"SELECT 1 FROM events WHERE {column} = ?", (event,)).fetchone() is None:
            print(f"vigild clip: no event {event} in {path}", file=sys.stderr)
            return EXIT_FAILURE
        found = clip_of_event(db, event) if has_clip_tables(db) else None
        segments = segments_between(db, found.camera, found.start_ts or 0.0, found.end_ts or 0.0) if found else []
    finally:
        db.close()
    if found is None:
        print(f"vigild clip: event {event} has no clip (it did not start or extend one)", file=sys.stderr)
        return EXIT_FAILURE
    if found.state != "saved":
        why = {"pending": "is not written yet", "writing": "is still being written",
               "expired": f"was removed by retention ({found.error})",
               "dropped": f"was dropped ({found.reason}{': ' + found.error if found.error else ''})"}  # fmt: skip
        print(f"vigild clip: the clip of event {event} {why.get(found.state, found.state)}", file=sys.stderr)
        return EXIT_FAILURE
    try:
        if found.path:
            source = found.checked_file()
        else:  # a window of the continuous segments: cut from them without decoding (GStreamer, from here on)
            from vigild.capture.recorder import exported

            files = [(s.checked_file(), s.start_ts) for s in segments if s.state == "saved" and s.start_ts is not None]
            source = exported(Path(found.root), export_relative(found.id), found.camera, found.id, files,
                              found.start_ts or 0.0, found.end_ts or 0.0)  # fmt: skip
        if args.output == "-":
            with source.open("rb") as f:
                shutil.copyfileobj(f, sys.stdout.buffer)
        else:
            shutil.copyfile(source, args.output)
    except (OSError, ValueError) as exc:
        print(f"vigild clip: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if args.output != "-":
        print(json.dumps(found.describe()))
    return EXIT_OK


def journal_of(args: argparse.Namespace) -> tuple[Path, str, str]:
    """The journal's path, the publisher's endpoint and the replay endpoint: from the config file (its `journal:`
    and `publisher:` sections only, so no plugin is imported), or `--journal`, `--endpoint` and `--replay-endpoint`.
    An unset replay endpoint is the daemon's default socket (vigild.paths: per config file, as the control socket;
    without a config, the default daemon's)."""
    from vigild import paths
    from vigild.config.loading import load_section
    from vigild.config.settings import JournalConfig, PublisherConfig
    from vigild.outputs.journal import default_path

    endpoint_arg, replay_arg = getattr(args, "endpoint", None), getattr(args, "replay_endpoint", None)
    if args.config is None:
        return Path(args.journal), endpoint_arg or DEFAULT_ENDPOINT, replay_arg or paths.replay_endpoint()
    journal = load_section(args.config, "journal", JournalConfig)
    publisher = load_section(args.config, "publisher", PublisherConfig)
    endpoint = endpoint_arg or publisher.endpoint
    replay = replay_arg or journal.replay_endpoint or paths.replay_endpoint(args.config)
    return journal.path or default_path(Path(args.config)), endpoint, replay


def follow(query: Any, endpoint: str, replay: str, keys: ClientKeys | None, after: int, printed: int) -> None:
    """The events after seq `after` that `query` selects, as they come (gap notices too), until interrupted or
    `query.limit` is reached."""
    from vigild.client import GAP_TOPIC
    from vigild.outputs import history

    with Subscriber(endpoint, curve=keys, resume=True, after_seq=after, replay_endpoint=replay) as subscriber:
        while query.limit is None or printed < query.limit:
            message = subscriber.receive()
            if message is None:
                continue
            gap = message.topic == GAP_TOPIC  # printed whatever the filters: what is missing may have matched
            if not gap and (message.event.get("type") == "heartbeat" or not history.matches(query, message.event)):
                continue
            print(json.dumps(message.event, separators=(",", ":")), flush=True)
            printed += 1


def sub(args: argparse.Namespace, keys: ClientKeys | None) -> int:
    received = 0
    if (args.after_seq is not None or args.replay_endpoint) and not args.resume:
        print("vigild sub: --after-seq and --replay-endpoint go with --resume", file=sys.stderr)
        return EXIT_FAILURE
    resume = (
        {"resume": True, "after_seq": args.after_seq, "replay_endpoint": args.replay_endpoint} if args.resume else {}
    )
    with Subscriber(args.endpoint, args.prefixes, curve=keys, **resume) as subscriber:
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


def cluster(args: argparse.Namespace, keys: ClientKeys | None) -> int:
    """`vigild cluster status` (the buckets, read directly) and `vigild cluster ready` (this host's daemon, through
    its control socket: a readiness probe)."""
    from vigild.config.cluster import ClusterConfig
    from vigild.config.loading import load_section
    from vigild.config.yamlsource import load_yaml

    try:
        settings = load_section(args.config, "cluster", ClusterConfig) if args.action == "status" else None
        control = load_control_settings(args.config)
    except ConfigError as exc:
        print(f"vigild: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if settings is not None:
        from vigild.cluster.view import cluster_report, format_report

        data = load_yaml(args.config).data
        cameras = list(data.get("cameras") or {}) if isinstance(data, dict) else []
        try:
            report = cluster_report(settings, cameras)
        except Exception as exc:  # unreachable, refused: say which
            message = str(exc) or type(exc).__name__
            if settings.password is not None:
                message = message.replace(settings.password.get_secret_value(), "***")
            print(f"vigild cluster: cannot read the cluster at {settings.nats}: {message}", file=sys.stderr)
            return EXIT_FAILURE
        print(json.dumps(report, indent=2) if args.json else format_report(report))
        return EXIT_OK
    from vigild.paths import control_endpoint

    endpoint = control.endpoint or control_endpoint(args.config)
    with ControlClient(endpoint, keys, args.timeout) as client:
        try:
            reply, _ = client.request("status")
        except TimeoutError as exc:
            print(f"vigild cluster ready: not ready: {exc}", file=sys.stderr)
            return EXIT_FAILURE
    state = (reply.get("result") or {}).get("cluster") if reply.get("ok") else None
    if state is None:
        print("vigild cluster ready: not ready: the daemon has no `cluster:` section or did not answer",
              file=sys.stderr)  # fmt: skip
        return EXIT_FAILURE
    if not state.get("ready"):
        waiting = ", ".join(state.get("not_streaming") or [])
        reason = state.get("error") or ("not registered yet" if not state.get("registered") else
                                        f"cameras held but not streaming: {waiting}" if waiting else "starting cameras")  # fmt: skip
        print(f"vigild cluster ready: not ready: {reason}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"ready: {state['member']} holds {len(state['held'])} camera(s)")
    return EXIT_OK

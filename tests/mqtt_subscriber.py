"""A subscriber in a process of its own (paho-mqtt): subscribes to TOPIC with QoS 1 and writes every message it
gets to OUT as a JSON line: topic, retain flag and payload (text, or `jpeg` bytes' length for a binary one).
Without --clean its session persists on the broker (a fixed client id): what arrives while it is away is kept."""

from __future__ import annotations

import argparse
import json
import signal
import sys

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion


def main() -> int:
    parser = argparse.ArgumentParser()
    for name in ("host", "port", "topic", "out", "client_id"):
        parser.add_argument(name)
    parser.add_argument("--clean", action="store_true")
    parser.add_argument("--username")
    parser.add_argument("--password")
    args = parser.parse_args()
    out = open(args.out, "a", buffering=1)  # noqa: SIM115 (open for the life of the process)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=args.client_id, clean_session=args.clean)
    if args.username:
        client.username_pw_set(args.username, args.password)
    client.reconnect_delay_set(1, 2)

    def on_connect(client, userdata, flags, reason, properties):
        if not reason.is_failure:
            client.subscribe(args.topic, qos=1)

    def on_message(client, userdata, message):
        try:
            payload: object = message.payload.decode()
        except UnicodeDecodeError:
            payload = {"binary": len(message.payload), "jpeg": message.payload[:2] == b"\xff\xd8"}
        out.write(json.dumps({"topic": message.topic, "retain": bool(message.retain), "payload": payload}) + "\n")

    client.on_connect = on_connect
    client.on_message = on_message
    signal.signal(signal.SIGTERM, lambda *_: client.disconnect())
    client.connect_async(args.host, int(args.port), keepalive=10)
    client.loop_forever(retry_first_connection=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

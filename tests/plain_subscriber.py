"""An independent subscriber for the end-to-end tests: plain pyzmq, none of vigild's code.

Usage: python plain_subscriber.py ENDPOINT OUTFILE IDLE_SECONDS
Writes one JSON line per message, `{"topic": ..., "event": {...}}`, and exits after IDLE_SECONDS without one
(counted from the first message: before it, it waits up to 10 minutes for a daemon that is still starting, since
how long a loaded machine takes to import torch is no signal that the stream is over).
A snapshot (third part) is saved next to OUTFILE as `<seq>.jpg`, and its file name is added as "snapshot_file".
"""

import json
import sys

import zmq

endpoint, outfile, idle = sys.argv[1], sys.argv[2], float(sys.argv[3])
context = zmq.Context()
socket = context.socket(zmq.SUB)
socket.setsockopt(zmq.RCVHWM, 0)  # keep everything: the test checks that nothing is missing
socket.setsockopt(zmq.SUBSCRIBE, b"")
socket.connect(endpoint)
with open(outfile, "w", encoding="utf-8") as out:
    print("ready", flush=True)
    timeout_ms = 600_000
    while socket.poll(timeout_ms):
        timeout_ms = int(idle * 1000)
        topic, payload, *rest = socket.recv_multipart()
        record = {"topic": topic.decode(), "event": json.loads(payload)}
        if rest:
            name = f"{outfile}.{record['event']['seq']}.jpg"
            with open(name, "wb") as image:
                image.write(rest[0])
            record["snapshot_file"] = name
        out.write(json.dumps(record) + "\n")
        out.flush()
socket.close(linger=0)
context.term()

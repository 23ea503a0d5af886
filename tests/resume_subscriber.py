"""A resuming subscriber in a process of its own, as a user's program would be: vigild.client.Subscriber with
`resume=True`, one JSON line per event (and per gap notice) in OUTFILE.

Usage: python resume_subscriber.py ENDPOINT REPLAY OUTFILE AFTER_SEQ IDLE_S [RCVHWM STALL_EVERY STALL_S]
It starts after AFTER_SEQ and exits after IDLE_S seconds without a message (counted from the first message). With
STALL_EVERY > 0 it stops reading for STALL_S seconds after every STALL_EVERY messages: a consumer that falls behind
(with a small RCVHWM, its live messages are dropped meanwhile, and it must fill the gaps by replay). At the end it
prints `{"replayed": N, "missed": M}` on stdout.
"""

import json
import sys
import time

from vigild.client import Subscriber

endpoint, replay, outfile, after, idle = sys.argv[1:6]
rcvhwm, stall_every, stall_s = (int(sys.argv[6]), int(sys.argv[7]), float(sys.argv[8])) if len(sys.argv) > 6 else (
    100_000, 0, 0.0)  # fmt: skip
subscriber = Subscriber(endpoint, rcvhwm=rcvhwm, resume=True, after_seq=int(after), replay_endpoint=replay)
count = 0
with open(outfile, "a", encoding="utf-8") as out:
    timeout = 600.0
    while (message := subscriber.receive(timeout=timeout)) is not None:
        timeout = float(idle)
        if message.event.get("type") == "heartbeat":
            continue
        record = {"topic": message.topic, "event": message.event, "snapshot_bytes": len(message.snapshot or b"")}
        out.write(json.dumps(record) + "\n")
        out.flush()
        count += 1
        if stall_every and count % stall_every == 0:
            time.sleep(stall_s)
print(json.dumps({"replayed": subscriber.replayed, "missed": subscriber.missed}), flush=True)
subscriber.close()

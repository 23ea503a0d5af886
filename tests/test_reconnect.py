"""A camera whose RTSP server dies and comes back, 20 times, in the daemon as a user runs it: each outage is
published as camera.down / camera.up, the other camera never stops, and nothing leaks across reconnects."""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path

import pytest
from conftest import VTEST, vigild
from streams import RtspServer
from test_e2e import events_of, stop

pytestmark = pytest.mark.e2e

CYCLES = 20


def resources(pid: int) -> tuple[int, int]:
    """(threads, open file descriptors) of a process, from /proc."""
    return len(os.listdir(f"/proc/{pid}/task")), len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.capture_modes
def test_rtsp_camera_survives_its_server_restarting_20_times(tmp_path: Path, endpoint, subscriber_factory, encoded_media):
    server = RtspServer({"/cam": encoded_media["h264"]}).start()
    config = tmp_path / "vigild.yaml"
    config.write_text(
        f"""\
cameras:
  gate:
    source: {server.url("/cam")}
    stall_timeout: 3
    reconnect: {{initial_delay: 0.1, max_delay: 0.5}}
  lobby:
    source: {VTEST}
    loop: true
publisher:
  endpoint: {endpoint}
  heartbeat_interval: 0.5
"""
    )
    subscriber = subscriber_factory(endpoint, idle_s=30)
    daemon = vigild("run", "--config", str(config))
    counts: list[tuple[int, int]] = []

    def gate_streaming(messages: list[dict]) -> bool:
        beats = events_of(messages, "heartbeat")
        return bool(beats) and beats[-1]["cameras"]["gate"]["state"] == "streaming"

    try:
        # the first camera.up may come before the subscription reached the daemon (PUB/SUB's slow joiner):
        # start counting from the first heartbeat that shows the camera streaming
        first = subscriber.wait_for(gate_streaming, timeout=30)
        ups_before = len(events_of(first, "camera.up", "gate"))
        for cycle in range(1, CYCLES + 1):
            time.sleep(0.5)  # mid-stream
            server.kill()
            subscriber.wait_for(lambda ms, n=cycle: len(events_of(ms, "camera.down", "gate")) >= n, timeout=30)
            server.start()
            subscriber.wait_for(
                lambda ms, n=ups_before + cycle: len(events_of(ms, "camera.up", "gate")) >= n, timeout=30
            )
            if cycle in (1, CYCLES):  # after the first reconnect, and after the last
                time.sleep(1.5)  # let the new connection settle (threads that finish the teardown exit)
                counts.append(resources(daemon.pid))
        code, _ = stop(daemon, timeout=15)
    finally:
        server.kill()
        if daemon.poll() is None:
            daemon.kill()
    assert code == 0
    messages = subscriber.finish()
    ups, downs = events_of(messages, "camera.up", "gate"), events_of(messages, "camera.down", "gate")
    assert len(ups) == ups_before + CYCLES  # one per reconnect
    assert len(downs) == CYCLES + 1  # one per outage, plus the one at stop
    assert all(up["width"] == 768 and up["decoder"] == "avdec_h264" for up in ups)
    assert all(down["reason"] in ("error", "end_of_stream") for down in downs[:-1]), [d["reason"] for d in downs]
    # the other camera never stopped: no down before the daemon stopped, frames in every heartbeat after its first
    assert [d["reason"] for d in events_of(messages, "camera.down", "lobby")] == ["stopped"]
    beats = [b["cameras"]["lobby"] for b in events_of(messages, "heartbeat")]
    streaming = [b for b in beats if b["state"] == "streaming"]
    assert len(streaming) >= len(beats) - 2
    processed = [b["frames"] for b in streaming]
    assert all(later > earlier for earlier, later in itertools.pairwise(processed)), processed
    gate = events_of(messages, "heartbeat")[-1]["cameras"]["gate"]
    assert gate["reconnects"] >= CYCLES
    (threads_first, fds_first), (threads_last, fds_last) = counts
    assert (threads_last, fds_last) == (threads_first, fds_first), counts

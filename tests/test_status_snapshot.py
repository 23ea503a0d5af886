"""One status snapshot feeds the heartbeat, `vigild ctl status`, systemd's STATUS= and the metrics (issue 16): the
metrics and the status line are functions of `Daemon.status()` alone. The snapshot here is written by the test (it
is the whole input of both, by the `StatusSource` protocol); test_service checks them on a running daemon."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from vigild.service.daemon import status_line
from vigild.service.metrics import DaemonCollector

SNAPSHOT = {
    "uptime_s": 12.5,
    "device": "cpu",
    "cameras": {
        "door": {"state": "streaming", "fps": 9.5, "frames": 120, "captured": 125, "drops": 5, "reconnects": 1,
                 "decode_errors": 2, "plugin_failures": 3},
        "yard": {"state": "paused", "fps": 0.0, "frames": 40, "captured": 40, "drops": 0, "reconnects": 0,
                 "decode_errors": 0, "plugin_failures": 0},
        "gate": {"state": "connecting", "fps": 0.0, "frames": 0, "captured": 0, "drops": 7, "reconnects": 4,
                 "decode_errors": 0, "plugin_failures": 0},
    },
    "capture": {"workers": [{"pid": 4001, "cameras": ["door"], "restarts": 0},
                            {"pid": 4077, "cameras": ["gate", "yard"], "restarts": 3}]},
    "scheduler": {"batches": 77},
    "plugins": {"detector": {"frames": 160, "failures": 3, "batch_failures": 1},
                "segmenter": {"frames": 12, "failures": 0, "batch_failures": 0,
                              "branch": {"unit": "frames", "pending": 2, "skipped": 140, "busy_s": 11.5}}},
    "publisher": {"sent": 300, "sent_by_type": {"track.update": 250, "heartbeat": 50}, "dropped_queue_full": 6,
                  "dropped_unsendable": 2, "last_seq": 301},
    "journal": {"enabled": True, "path": "/var/lib/vigild/journal.db", "stored": 280, "not_journaled": 21,
                "queued": 4, "error": "OSError: [Errno 28] No space left on device", "replay": "tcp://127.0.0.1:5556"},
    "outputs": {"publisher": {"state": "running", "delivered": 300, "lag_events": 0, "lag_s": 0.0, "drops": {}},
                "home": {"state": "disconnected", "delivered": 90, "lag_events": 41, "lag_s": 12.5,
                         "drops": {"retention": 3}, "connected": False}},
    "recording": {"state": "running", "error": None, "root": "/var/lib/vigild/recordings", "writing": 2, "saved": 17,
                  "segments": 40, "dropped": {"disk_full": 2, "no_keyframe": 1}, "expired": 5, "repaired": 1,
                  "bytes": 123456789},
}  # fmt: skip


class Snapshot:
    def status(self) -> dict:
        return SNAPSHOT


def scrape() -> dict[str, float]:
    registry = CollectorRegistry()
    registry.register(DaemonCollector(Snapshot()))
    samples = {}
    for line in generate_latest(registry).decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_the_metrics_are_the_snapshots_numbers():
    got = scrape()
    assert got['vigild_camera_frames_total{camera="door"}'] == 120
    assert got['vigild_camera_captured_frames_total{camera="door"}'] == 125
    assert got['vigild_camera_dropped_frames_total{camera="gate"}'] == 7
    assert got['vigild_camera_reconnects_total{camera="gate"}'] == 4
    assert got['vigild_camera_decode_errors_total{camera="door"}'] == 2
    assert got['vigild_camera_plugin_failures_total{camera="door"}'] == 3
    assert got['vigild_camera_fps{camera="door"}'] == 9.5
    assert got['vigild_camera_state{camera="yard",state="paused"}'] == 1
    assert got['vigild_camera_state{camera="yard",state="streaming"}'] == 0
    assert got['vigild_camera_state{camera="gate",state="connecting"}'] == 1
    assert got['vigild_events_published_total{type="track.update"}'] == 250
    assert got['vigild_events_dropped_total{reason="queue_full"}'] == 6
    assert got['vigild_events_dropped_total{reason="unsendable"}'] == 2
    assert got["vigild_batches_total"] == 77
    assert got["vigild_journal_stored_total"] == 280
    assert got["vigild_journal_not_journaled_total"] == 21
    assert got["vigild_journal_queued"] == 4
    assert got["vigild_journal_error"] == 1
    assert got['vigild_plugin_failures_total{plugin="detector"}'] == 3
    assert got['vigild_plugin_batch_failures_total{plugin="detector"}'] == 1
    assert got["vigild_uptime_seconds"] == 12.5
    assert got['vigild_plugin_frames_total{plugin="detector"}'] == 160
    assert got['vigild_plugin_frames_total{plugin="segmenter"}'] == 12
    assert got['vigild_branch_pending{plugin="segmenter",unit="frames"}'] == 2
    assert got['vigild_branch_skipped_total{plugin="segmenter",unit="frames"}'] == 140
    assert not any(key.startswith('vigild_branch_pending{plugin="detector"') for key in got)  # not a branch
    assert got['vigild_capture_worker_restarts_total{worker="0"}'] == 0
    assert got['vigild_capture_worker_restarts_total{worker="1"}'] == 3


def test_the_status_line_is_the_snapshots_numbers():
    assert status_line(SNAPSHOT) == "1/3 cameras streaming, 1 paused, 9.5 frames/s, 12 dropped"


def test_the_histograms_are_the_pipelines_counts():
    """The latency and plugin-time histograms are counted where they are measured and only read at a scrape."""
    from vigild.pipeline.durations import LATENCY_BUCKETS, PLUGIN_BUCKETS, Durations, Timings
    from vigild.service.metrics import TimingCollector

    latency, detector = Durations(LATENCY_BUCKETS), Durations(PLUGIN_BUCKETS)
    for seconds in (0.01, 0.04, 0.04, 30.0):  # 0.01 is in the 0.01 bucket (at most its bound)
        latency.observe(seconds)
    detector.observe(0.002)

    class Timed:
        def timings(self) -> Timings:
            return Timings(latency.read(), {"detector": detector.read()})

    registry = CollectorRegistry()
    registry.register(TimingCollector(Timed()))
    got = {}
    for line in generate_latest(registry).decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            got[name] = float(value)
    assert got['vigild_latency_seconds_bucket{le="0.01"}'] == 1
    assert got['vigild_latency_seconds_bucket{le="0.05"}'] == 3
    assert got['vigild_latency_seconds_bucket{le="10.0"}'] == 3
    assert got['vigild_latency_seconds_bucket{le="+Inf"}'] == got["vigild_latency_seconds_count"] == 4
    assert got["vigild_latency_seconds_sum"] == 30.09
    assert got['vigild_plugin_seconds_bucket{le="0.001",plugin="detector"}'] == 0
    assert got['vigild_plugin_seconds_bucket{le="0.0025",plugin="detector"}'] == 1
    assert got['vigild_plugin_seconds_created{plugin="detector"}'] == detector.created


def test_each_output_has_its_state_lag_and_drops():
    got = scrape()
    assert got['vigild_output_state{output="home",state="disconnected"}'] == 1
    assert got['vigild_output_state{output="home",state="running"}'] == 0
    assert got['vigild_output_state{output="publisher",state="running"}'] == 1
    assert got['vigild_output_lag_events{output="home"}'] == 41
    assert got['vigild_output_lag_seconds{output="home"}'] == 12.5
    assert got['vigild_output_delivered_total{output="publisher"}'] == 300
    assert got['vigild_output_dropped_total{output="home",reason="retention"}'] == 3
    assert got['vigild_output_connected{output="home"}'] == 0
    assert 'vigild_output_connected{output="publisher"}' not in got


def test_recording_has_its_clips_drops_and_bytes():
    got = scrape()
    assert got['vigild_recording_clips_total{result="saved"}'] == 17
    assert got['vigild_recording_clips_total{result="segments"}'] == 40
    assert got['vigild_recording_clips_total{result="dropped"}'] == 3
    assert got['vigild_recording_clips_total{result="expired"}'] == 5
    assert got['vigild_recording_clips_total{result="repaired"}'] == 1
    assert got['vigild_recording_dropped_total{reason="disk_full"}'] == 2
    assert got["vigild_recording_bytes"] == 123456789
    assert got["vigild_recording_writing"] == 2

"""How many capture workers a daemon runs (`capture.workers`), and where their shared-memory record lives."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from vigild import paths
from vigild.capture.exchange import FrameExchange
from vigild.capture.pool import CaptureWorkers, auto_workers
from vigild.config.settings import CaptureSettings

log = logging.getLogger("vigild")

ENV_WORKERS = "VIGILD_CAPTURE_WORKERS"
"""When set (0..64), what `capture.workers: auto` means: to run a whole installation, or a test suite, either way."""


class WorkersVariableError(ValueError):
    """VIGILD_CAPTURE_WORKERS is set to something that is not a worker count."""


class RuntimeDirError(WorkersVariableError):
    """The runtime directory, where the workers' shared-memory record lives, cannot be used (another user's, not a
    directory): an environment error like the variable's, reported before anything starts."""


def worker_count(settings: CaptureSettings, usable_cpus: int, cameras: int) -> int:
    if settings.workers != "auto":
        return settings.workers
    override = os.environ.get(ENV_WORKERS, "").strip()
    if override:
        try:
            count = int(override)
        except ValueError:
            count = -1
        if not 0 <= count <= 64:
            raise WorkersVariableError(
                f"{ENV_WORKERS}={override!r}: expected a whole number of worker processes, 0 to 64"
            )
        return count
    return auto_workers(usable_cpus, cameras)


def capture_workers(
    settings: CaptureSettings, exchange: FrameExchange, usable_cpus: int, cameras: int, config_file: Path | None = None
) -> CaptureWorkers | None:
    """The worker pool (not started), or None for capture threads in the daemon. Its shared-memory record goes in
    the runtime directory of the daemon run with `config_file` (vigild.paths.runtime_dir), made owner-only here."""
    count = worker_count(settings, usable_cpus, cameras)
    if count == 0:
        return None
    # colour conversion in each worker: the CPUs shared among them
    cv2_threads = max(1, usable_cpus // count)
    try:
        runtime = paths.private_dir(paths.runtime_dir(config_file))
    except OSError as exc:
        raise RuntimeDirError(f"the runtime directory (capture workers' shared-memory records): {exc}") from None
    return CaptureWorkers(count, settings.slots, exchange, runtime, cv2_threads)

"""The systemd integration: systemd/vigild.service, systemd/vigild.sysusers and scripts/install-service.sh.

`systemd-analyze verify` and `systemd-analyze security --offline=yes` work without systemd as PID 1 (they load the
unit the way the manager would, offline), so they run here too; only a missing `systemd-analyze` skips them.
Neither resolves `User=`/`Group=`/`SupplementaryGroups=` (the manager does that when it spawns the service), so
the user vigild need not exist for them. verify exits 0 on a misspelt or unparsable directive and only logs it
("Unknown key ...", "Failed to parse ..."), hence the check that stderr says nothing about the unit at all.

The other tests check what the unit's settings do rather than repeat its values: the daemon started as the unit
says (ExecStart=, Environment=, the directories, the notify socket and watchdog systemd would give it) becomes
ready, pings, reloads on ExecReload= (and survives reloading a broken file) and stops cleanly on KillSignal=; what the
daemon writes by default, computed by its own code, is writable under ProtectSystem=strict; the sysusers file makes
every user and group the unit names; the unit's environment makes the detector refuse a crafted pickle; the address
policy, read by systemd's rule, keeps public addresses out; the key commands docs/service.md gives leave the secret
readable by the service user alone.
The sandbox itself (seccomp, namespaces, DeviceAllow=) needs the manager and is only scored by systemd-analyze; that
MemoryDenyWriteExecute= must stay off for CUDA's JIT is the unit's claim, not tested: no CUDA code has run.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import pytest
import zmq.auth
from conftest import free_endpoint

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "vigild.service"
SYSUSERS = ROOT / "systemd" / "vigild.sysusers"
INSTALL = ROOT / "scripts" / "install-service.sh"
EXAMPLE = ROOT / "configs" / "test-pattern.yaml"

INSTALLED_VIGILD = "/opt/vigild/.venv/bin/vigild"
CONFIG = "/etc/vigild/vigild.yaml"

TRUE = {"1", "yes", "true", "on"}

Unit = dict[str, dict[str, list[str]]]


def parse_unit(text: str) -> Unit:
    """section → key → every value in file order (DeviceAllow=, Environment=, ... repeat)."""
    sections: Unit = {}
    current: dict[str, list[str]] | None = None
    lines = iter(enumerate(text.splitlines(), 1))
    for number, raw in lines:
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        while line.endswith("\\"):  # a continuation line
            line = line[:-1] + " " + next(lines)[1].strip()
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, f"line {number} is neither a section nor a Key=value in one: {raw!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def effective(values: list[str]) -> list[str]:
    """What a list setting amounts to: an empty assignment resets everything before it."""
    reset = max((i for i, value in enumerate(values) if value == ""), default=-1)
    return values[reset + 1 :]


def seconds(span: str) -> float:
    """A systemd time span ("30", "30s", "1min 30s", "500ms") in seconds."""
    units = {"": 1, "s": 1, "sec": 1, "second": 1, "seconds": 1, "ms": 1e-3, "msec": 1e-3, "m": 60, "min": 60,
             "minute": 60, "minutes": 60, "h": 3600, "hr": 3600, "hour": 3600, "hours": 3600}  # fmt: skip
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", span)
    assert parts and "".join(f"{n}{u}" for n, u in parts) == span.replace(" ", ""), f"not a time span: {span!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


@pytest.fixture(scope="module")
def unit() -> Unit:
    return parse_unit(UNIT.read_text())


@pytest.fixture(scope="module")
def service(unit: Unit) -> dict[str, list[str]]:
    return unit["Service"]


def one(service: dict[str, list[str]], key: str) -> str:
    values = service.get(key, [])
    assert len(values) == 1, f"{key}= should be set once, found {values}"
    return values[0]


# --- systemd-analyze ------------------------------------------------------------------------------------------------

needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")


def _analyze(*args: str) -> subprocess.CompletedProcess[str]:
    # info level, so that the warnings verify prints about a unit are not filtered by the caller's environment
    env = {**os.environ, "SYSTEMD_LOG_LEVEL": "info", "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": "cat"}
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True, env=env, timeout=120)


def _supports(option: str) -> bool:
    return option in _analyze("--help").stdout


def _testable_copy(directory: Path, text: str | None = None) -> Path:
    """The unit with ExecStart= pointing at this interpreter's `vigild` (verify checks that the binary exists)."""
    vigild = Path(sys.executable).parent / "vigild"
    assert vigild.is_file(), f"{vigild} missing: install the checkout into this environment (pip install -e .)"
    text = UNIT.read_text() if text is None else text
    assert INSTALLED_VIGILD in text
    path = directory / "vigild.service"
    path.write_text(text.replace(INSTALLED_VIGILD, str(vigild)))
    return path


def _verify(path: Path) -> subprocess.CompletedProcess[str]:
    args = ["verify", "--man=no"]
    if _supports("--recursive-errors"):
        args.append("--recursive-errors=no")  # the unit's own problems, not those of units it pulls in
    return _analyze(*args, str(path))


def _about_unit(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in (result.stdout + result.stderr).splitlines() if "vigild.service" in line]


@needs_analyze
def test_systemd_analyze_verify_passes(tmp_path: Path) -> None:
    result = _verify(_testable_copy(tmp_path))
    report = f"systemd-analyze verify exited {result.returncode}:\n{result.stdout}{result.stderr}"
    assert result.returncode == 0, report
    assert _about_unit(result) == [], report


@needs_analyze
def test_systemd_analyze_verify_would_report_a_broken_directive(tmp_path: Path) -> None:
    """The check above means something: a misspelt key and a bad value exit 0 but are logged, naming the unit."""
    text = UNIT.read_text().replace("ProtectSystem=strict", "ProtectSytem=strict").replace("Type=notify", "Type=notfy")
    result = _verify(_testable_copy(tmp_path, text))
    lines = _about_unit(result)
    assert any("ProtectSytem" in line for line in lines), result.stderr
    assert any("notfy" in line for line in lines), result.stderr


@needs_analyze
def test_systemd_analyze_security_exposure_is_low(tmp_path: Path) -> None:
    if not _supports("--offline"):
        pytest.skip("this systemd-analyze has no `security --offline` (systemd < 250)")
    # 2.0 of 10 ("OK"; the unit scores 1.6 with systemd 252): catches a sandbox setting dropped by accident
    result = _analyze("security", "--offline=yes", "--threshold=20", str(_testable_copy(tmp_path)))
    assert result.returncode == 0, f"exposure above 2.0:\n{result.stdout}{result.stderr}"


# --- device access ------------------------------------------------------------------------------------------------


def test_unit_device_access(service: dict[str, list[str]]) -> None:
    """DeviceAllow= globs match the device groups (as /proc/devices names them) of the GPUs and cameras the daemon
    can use, and no others (matched with fnmatch, as systemd matches them)."""
    # PrivateDevices=yes would hide the GPUs and cameras: DevicePolicy=closed with an allow list instead
    assert all(value.lower() not in TRUE for value in service.get("PrivateDevices", []))
    assert one(service, "DevicePolicy") == "closed"
    allowed = [value.split() for value in effective(service["DeviceAllow"])]
    assert all(len(entry) == 2 for entry in allowed), allowed

    def allows(group: str) -> bool:
        """`group` as named in /proc/devices, read-write through a char-<glob> entry."""
        return any(
            spec.startswith("char-") and fnmatch.fnmatchcase(group, spec[5:]) and {"r", "w"} <= set(mode)
            for spec, mode in allowed
        )

    # nvidia-frontend or nvidia: /dev/nvidia0.. and /dev/nvidiactl (by driver build); nvidia-uvm: /dev/nvidia-uvm
    # and -tools; nvidia-caps: MIG; drm: /dev/dri/*; video4linux: /dev/video*
    for group in ("nvidia-frontend", "nvidia", "nvidia-uvm", "nvidia-caps", "drm", "video4linux"):
        assert allows(group), f"DeviceAllow= has no rw entry for the device group {group}: {allowed}"
    assert not allows("mem") and not allows("sd"), "only GPU and camera device groups"


# --- sysusers.d ------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="systemd-sysusers is not installed")
def test_sysusers_file_makes_every_user_and_group_the_unit_runs_as(
    tmp_path: Path, service: dict[str, list[str]]
) -> None:
    """Applied to an empty root (works unprivileged), the sysusers file creates the unit's User= and Group=, makes the
    user a member of every SupplementaryGroups= (a missing one fails the start with 216/GROUP), with the unit's
    state directory as home and no login shell."""
    (tmp_path / "etc").mkdir()
    result = subprocess.run(
        ["systemd-sysusers", f"--root={tmp_path}", str(SYSUSERS)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    passwd = {line.split(":")[0]: line.split(":") for line in (tmp_path / "etc/passwd").read_text().splitlines()}
    groups = {line.split(":")[0]: line.split(":") for line in (tmp_path / "etc/group").read_text().splitlines()}
    user = passwd[one(service, "User")]
    assert user[3] == groups[one(service, "Group")][2], "Group= is not the user's primary group"
    for group in (g for value in effective(service.get("SupplementaryGroups", [])) for g in value.split()):
        assert group in groups, f"SupplementaryGroups={group} would not exist"
        assert user[0] in groups[group][3].split(","), f"{user[0]} is not in {group}"
    assert user[5] == "/var/lib/" + one(service, "StateDirectory") == one(service, "WorkingDirectory")
    assert user[6].endswith("/nologin")


# --- the unit run as systemd would run it ---------------------------------------------------------------------------
#
# No systemd manager runs here (and the tests do not run as root), so what the manager would do for this unit is done
# by hand, with the unit's own values: the process is ExecStart= (the installed console script and the config the
# install script stages), in WorkingDirectory= with Environment=, the *_DIRECTORY variables systemd derives from
# RuntimeDirectory=/StateDirectory=/ConfigurationDirectory=, $NOTIFY_SOCKET and $WATCHDOG_USEC from WatchdogSec=.
# The file system paths the unit names are moved under a temporary root. What cannot be shown without the manager
# (the sandbox, the user switch, DeviceAllow=) is left to systemd-analyze above.

SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class ServiceRoot:
    """A temporary root for the paths the unit names, and the install script's staging of the files into it."""

    def __init__(self, tmp_path: Path, prefix: str = "/opt/vigild"):
        self.root = tmp_path / "root"
        self.prefix = Path(prefix)
        result = _install("--destdir", str(self.root), "--no-venv", "--prefix", prefix, cwd=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
        self.unit = parse_unit((self.root / "etc/systemd/system/vigild.service").read_text())
        self.service = self.unit["Service"]

    def path(self, absolute: str) -> Path:
        assert absolute.startswith("/"), absolute
        return self.root / absolute.lstrip("/")

    def directories(self) -> dict[str, str]:
        """The *_DIRECTORY variables and paths systemd makes from the unit's directory settings (systemd.exec(5))."""
        bases = {"Runtime": "/run", "State": "/var/lib", "Cache": "/var/cache", "Logs": "/var/log",
                 "Configuration": "/etc"}  # fmt: skip
        made = {}
        for kind, base in bases.items():
            names = [name for value in effective(self.service.get(f"{kind}Directory", [])) for name in value.split()]
            if names:
                made[f"{kind.upper()}_DIRECTORY"] = ":".join(f"{base}/{name}" for name in names)
        return made

    def writable(self) -> list[str]:
        """Where ProtectSystem=strict leaves the service write access: its Runtime/State/Cache/Logs directories,
        ReadWritePaths=, and /tmp with PrivateTmp= (ProtectHome= hides /home; /etc is read-only)."""
        assert one(self.service, "ProtectSystem") == "strict"
        places = [
            path
            for key, value in self.directories().items()
            if key != "CONFIGURATION_DIRECTORY"
            for path in value.split(":")
        ]
        places += [p.lstrip("-") for value in effective(self.service.get("ReadWritePaths", [])) for p in value.split()]
        if one(self.service, "PrivateTmp").lower() in TRUE:
            places += ["/tmp", "/var/tmp"]
        return places

    def environment(self, notify: Path, extra: dict[str, str]) -> dict[str, str]:
        env = {"PATH": SYSTEMD_PATH, "LANG": "C.UTF-8", **self.directories()}
        for value in self.service.get("Environment", []):
            env.update(item.split("=", 1) for item in shlex.split(value))
        env["NOTIFY_SOCKET"] = str(notify)
        env["WATCHDOG_USEC"] = str(int(seconds(one(self.service, "WatchdogSec")) * 1e6))
        env.update(extra)  # what EnvironmentFile=-/etc/vigild/cameras.env would add
        return {key: self.moved(value) for key, value in env.items()}

    def moved(self, value: str) -> str:
        """`value` with every path under the unit's directories moved under the temporary root."""
        for path in self.directories().values():
            for directory in path.split(":"):
                value = re.sub(rf"(?<![\w/]){re.escape(directory)}(?=/|:|$)", str(self.path(directory)), value)
        return value


def inside(path: str, places: list[str]) -> bool:
    return any(path == place or path.startswith(place.rstrip("/") + "/") for place in places)


class CredentialedNotifySocket:
    """systemd's notify socket: datagrams with the sender's credentials (SO_PASSCRED), so NotifyAccess= can be
    judged by the sending process's pid."""

    def __init__(self, path: Path):
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.socket.bind(str(path))
        self.received: list[tuple[int, str]] = []

    def wait_for(self, line: str, timeout: float) -> list[tuple[int, str]]:
        """Messages (sender pid, line) up to and including the first `line` within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        start = len(self.received)
        while time.monotonic() < deadline:
            self.socket.settimeout(max(0.01, min(0.5, deadline - time.monotonic())))
            try:
                data, ancillary, _, _ = self.socket.recvmsg(65536, socket.CMSG_SPACE(struct.calcsize("3i")))
            except TimeoutError:
                continue
            pid = next(
                struct.unpack("3i", payload)[0]
                for level, kind, payload in ancillary
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
            )
            lines = data.decode().splitlines()
            self.received += [(pid, got) for got in lines]
            if line in lines:
                return self.received[start:]
        raise AssertionError(f"no {line!r} within {timeout} s; got {[got for _, got in self.received][-20:]}")

    def close(self) -> None:
        self.socket.close()


def test_default_writable_paths_of_the_daemon_are_writable_under_the_unit(tmp_path: Path) -> None:
    """Every place the daemon writes by default, as its own code computes it in the unit's environment, is one
    ProtectSystem=strict leaves writable: the control socket, ultralytics' settings, HOME (GStreamer's cache)."""
    from vigild.config.loading import ControlConfig, PublisherConfig
    from vigild.service.control import default_endpoint

    staged = ServiceRoot(tmp_path)
    writable = staged.writable()
    env = {**staged.directories()}
    for value in staged.service.get("Environment", []):
        env.update(item.split("=", 1) for item in shlex.split(value))
    assert ControlConfig().endpoint is None  # unset: the control socket goes where default_endpoint says
    for endpoint in (default_endpoint(env), PublisherConfig().endpoint):
        if endpoint.startswith("ipc://"):
            assert inside(str(Path(endpoint[6:]).parent), writable), f"{endpoint} is not writable under the unit"
    for variable in ("HOME", "YOLO_CONFIG_DIR", "XDG_CACHE_HOME", "TMPDIR"):
        if variable in env:
            assert inside(env[variable], writable), f"{variable}={env[variable]} is read-only under the unit"
    assert inside(one(staged.service, "WorkingDirectory"), writable)
    from vigild.outputs.journal import default_path
    from vigild.paths import runtime_dir, state_dir

    config = Path("/etc/vigild/vigild.yaml")
    journal = default_path(config, env)  # the event journal and its snapshots
    assert inside(str(journal.parent), writable), f"the journal {journal} is read-only under the unit"
    assert journal.parent == state_dir(config, env) == Path(env["STATE_DIRECTORY"])
    assert inside(str(runtime_dir(config, env)), writable)  # sockets and shared-memory records


def test_address_families_cover_the_sockets_the_daemon_opens_by_default(service: dict[str, list[str]]) -> None:
    """RestrictAddressFamilies= allows what the defaults need: AF_UNIX (sd_notify, journald, the ipc:// control
    socket), and the family of the publisher's and the metrics server's default addresses."""
    from vigild.config.loading import MetricsConfig, PublisherConfig

    def family(host: str) -> str:
        return {4: "AF_INET", 6: "AF_INET6"}[ipaddress.ip_address(host.strip("[]")).version]

    publisher_host = PublisherConfig().endpoint.removeprefix("tcp://").rsplit(":", 1)[0]
    needed = {"AF_UNIX", family(publisher_host), family(MetricsConfig().address)}
    allowed = [family for value in effective(service["RestrictAddressFamilies"]) for family in value.split()]
    assert not any(family.startswith("~") for family in allowed), "an allow list, not a deny list"
    assert needed <= set(allowed)


def test_timeout_stop_outlasts_the_daemons_own_stop_bound(tmp_path: Path) -> None:
    """SIGKILL must not cut a clean stop short: TimeoutStopSec= exceeds the longest a stop may take by the daemon's
    own bounds (scheduler join, then captures' join, then the publisher's linger)."""
    from vigild.config.loading import PublisherConfig
    from vigild.service.daemon import CAPTURE_JOIN_TIMEOUT_S, SCHEDULER_JOIN_TIMEOUT_S

    staged = ServiceRoot(tmp_path)
    bound = SCHEDULER_JOIN_TIMEOUT_S + CAPTURE_JOIN_TIMEOUT_S + PublisherConfig().linger_ms / 1000
    assert seconds(one(staged.service, "TimeoutStopSec")) > bound


class UnitProcess:
    """The daemon started as ExecStart= says, in the staged root, with what systemd would give it."""

    def __init__(self, tmp_path: Path, staged: ServiceRoot):
        self.staged = staged
        service = staged.service
        assert one(service, "Type") == "notify"
        argv = shlex.split(one(service, "ExecStart"))
        # a console script of the package, in the venv the install script makes (PREFIX/.venv, its --help says)
        scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
        assert Path(argv[0]).parent == staged.prefix / ".venv" / "bin"
        assert scripts.get(Path(argv[0]).name) == "vigild.cli:main"
        vigild = Path(sys.executable).parent / Path(argv[0]).name  # the same console script, installed here
        assert vigild.is_file()
        config_argument = argv[argv.index("--config") + 1]
        self.config = staged.path(config_argument)
        assert self.config.is_file(), "ExecStart's --config is not the file the install script installs"
        for directory in staged.directories().values():
            staged.path(directory).mkdir(parents=True, exist_ok=True)
        self.runtime = staged.path(staged.directories()["RUNTIME_DIRECTORY"])
        self.runtime.chmod(int(one(service, "RuntimeDirectoryMode"), 8))
        self.notify = CredentialedNotifySocket(tmp_path / "notify")
        env = staged.environment(tmp_path / "notify", {"VIGILD_PUB": free_endpoint()})
        self.log_path = tmp_path / "daemon.log"
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [str(vigild), *(str(self.config) if a == config_argument else a for a in argv[1:])],
            env=env,
            cwd=staged.path(one(service, "WorkingDirectory")),
            stderr=self._log,
        )

    def reload(self) -> None:
        """ExecReload=, as `systemctl reload` runs it."""
        command = shlex.split(one(self.staged.service, "ExecReload").replace("$MAINPID", str(self.process.pid)))
        assert subprocess.run(command, timeout=30).returncode == 0

    def stop(self) -> int:
        """KillSignal=, then the exit status within TimeoutStopSec=."""
        kill = one(self.staged.service, "KillSignal")
        self.process.send_signal(signal.Signals[kill if kill.startswith("SIG") else f"SIG{kill}"])
        return self.process.wait(seconds(one(self.staged.service, "TimeoutStopSec")))

    def log_text(self) -> str:
        return self.log_path.read_text()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._log.close()
        self.notify.close()


def proc_status(pid: int) -> dict[str, str]:
    return dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)


@pytest.mark.e2e
def test_the_unit_runs_the_installed_daemon_as_systemd_would(tmp_path: Path) -> None:
    """ExecStart= names the console script the install script's venv gets and the config it stages; the daemon
    started that way reports READY=1 from its main process (Type=notify, NotifyAccess=main), pings the watchdog
    within WatchdogSec=, keeps its control socket in $RUNTIME_DIRECTORY, stays within the unit's TasksMax= and
    MemoryHigh=, reloads on ExecReload=, and stops cleanly on KillSignal= before TimeoutStopSec= would kill it."""
    staged = ServiceRoot(tmp_path, "/srv/vigild-test")
    service = staged.service
    unit = UnitProcess(tmp_path, staged)
    process, notify = unit.process, unit.notify
    try:
        got = notify.wait_for("READY=1", seconds(one(service, "TimeoutStartSec")))
        got += notify.wait_for("WATCHDOG=1", seconds(one(service, "WatchdogSec")))
        # the control socket where the daemon's default puts it, in a directory only the service user enters
        assert (unit.runtime / "control").is_socket()
        assert unit.runtime.stat().st_mode & 0o077 == 0
        # running, the daemon is well inside the cgroup limits (no child processes: its threads are its tasks)
        status = proc_status(process.pid)
        assert int(status["Threads"]) * 4 < int(one(service, "TasksMax"))
        assert int(status["VmHWM"].split()[0]) * 1024 * 4 < size(one(service, "MemoryHigh"))

        unit.reload()
        got += notify.wait_for("RELOADING=1", 30)
        got += notify.wait_for("READY=1", 30)
        code = unit.stop()
        got += notify.wait_for("STOPPING=1", 5)
    finally:
        unit.close()
    text = unit.log_text()
    assert code == 0, text[-3000:]
    assert "reloading" in text, text[-3000:]
    senders = {pid for pid, _ in got}
    assert senders == {process.pid}, f"notifications from {senders}, main process {process.pid} (NotifyAccess=main)"
    # the daemon wrote nothing into the read-only configuration directory
    assert sorted(p.name for p in unit.config.parent.iterdir()) == [unit.config.name]


@pytest.mark.e2e
def test_a_reload_with_a_broken_config_leaves_the_unit_running(tmp_path: Path) -> None:
    """What the unit says of ExecReload=: a config that cannot even be decoded (one Latin-1 byte) is refused and
    logged, the daemon goes on with the previous config (it still pings the watchdog) and stops cleanly later."""
    staged = ServiceRoot(tmp_path)
    unit = UnitProcess(tmp_path, staged)
    try:
        unit.notify.wait_for("READY=1", seconds(one(staged.service, "TimeoutStartSec")))
        unit.config.write_bytes(unit.config.read_bytes() + b"# caf\xe9\n")
        unit.reload()
        unit.notify.wait_for("RELOADING=1", 30)
        deadline = time.monotonic() + 60
        while "still running the previous config" not in unit.log_text() and unit.process.poll() is None:
            assert time.monotonic() < deadline, unit.log_text()[-3000:]
            time.sleep(0.1)
        assert unit.process.poll() is None, f"the daemon exited on a reload:\n{unit.log_text()[-3000:]}"
        unit.notify.wait_for("WATCHDOG=1", seconds(one(staged.service, "WatchdogSec")))
        code = unit.stop()
    finally:
        unit.close()
    assert code == 0, unit.log_text()[-3000:]
    assert "Traceback" not in unit.log_text()


def size(value: str) -> int:
    """A systemd byte size ("16G", "512M", "1024") in bytes (base 1024, as systemd reads it)."""
    match = re.fullmatch(r"(\d+)([KMGT]?)", value)
    assert match, f"not an absolute byte size: {value!r}"
    return int(match[1]) * 1024 ** "_KMGT".index(match[2] or "_")


def test_resource_limits_bound_the_daemon_and_kill_before_the_host_runs_out(service: dict[str, list[str]]) -> None:
    """A runaway daemon (a leak, a flood of requests, a compromised process forking) is throttled at MemoryHigh=,
    killed at MemoryMax= (below it, so throttling comes first), and cannot have more than TasksMax= tasks. How much a
    running daemon takes compared to these is checked in the test above."""
    high, limit = size(one(service, "MemoryHigh")), size(one(service, "MemoryMax"))
    assert 0 < high < limit
    assert one(service, "TasksMax").isdigit()
    assert one(service, "Restart") == "on-failure"  # a kill at MemoryMax= (SIGKILL) is a failure: it is restarted


# systemd.resource-control(5), "Special address/network names"
SYMBOLIC = {
    "any": ["0.0.0.0/0", "::/0"],
    "localhost": ["127.0.0.0/8", "::1/128"],
    "link-local": ["169.254.0.0/16", "fe80::/64"],
    "multicast": ["224.0.0.0/4", "ff00::/8"],
}


def ip_allowed(service: dict[str, list[str]], address: str) -> bool:
    """systemd's rule: allowed if on IPAddressAllow=, else denied if on IPAddressDeny=, else allowed."""

    def networks(key: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        entries = [entry for value in effective(service.get(key, [])) for entry in value.split()]
        return [ipaddress.ip_network(net) for entry in entries for net in SYMBOLIC.get(entry, [entry])]

    ip = ipaddress.ip_address(address)
    if any(ip in net for net in networks("IPAddressAllow")):
        return True
    return not any(ip in net for net in networks("IPAddressDeny"))


def test_address_policy_lets_local_networks_through_and_keeps_public_ones_out(service: dict[str, list[str]]) -> None:
    """Loopback (the default publisher, metrics and any tcp:// control endpoint), LAN cameras and clients (RFC 1918,
    IPv6 unique-local and link-local) and multicast RTP are reachable; a public address is not, so a compromised
    daemon cannot send what it sees, or fetch code, anywhere on the internet."""
    from vigild.config.loading import MetricsConfig, PublisherConfig

    publisher_host = PublisherConfig().endpoint.removeprefix("tcp://").rsplit(":", 1)[0].strip("[]")
    local = [publisher_host, MetricsConfig().address, "127.0.0.1", "::1", "192.168.1.64", "10.20.30.40",
             "172.16.5.9", "172.31.255.1", "169.254.10.1", "fd12:3456::1", "fe80::1:2", "239.255.0.1"]  # fmt: skip
    public = ["8.8.8.8", "1.1.1.1", "203.0.113.7", "172.32.0.1", "2606:4700:4700::1111", "2001:db8::1"]
    assert [a for a in local if not ip_allowed(service, a)] == []
    assert [a for a in public if ip_allowed(service, a)] == []


@pytest.mark.e2e
def test_the_units_environment_refuses_a_crafted_checkpoint_and_loads_a_real_one(tmp_path: Path) -> None:
    """With the unit's Environment= (ULTRALYTICS_SAFE_LOAD), the detector's loader refuses a .pt that is a pickle
    running a command, and the command does not run; a genuine ultralytics checkpoint still loads. Without it, the
    same file runs its command (what the setting prevents)."""
    staged = ServiceRoot(tmp_path)
    for directory in staged.directories().values():
        staged.path(directory).mkdir(parents=True, exist_ok=True)
    env = staged.environment(tmp_path / "notify", {})
    ran = tmp_path / "ran"
    make = f"""
import os, pickle
class Payload:
    def __reduce__(self):
        return (os.system, ("touch {ran}",))
with open("{tmp_path}/crafted.pt", "wb") as file:
    pickle.dump({{"model": Payload(), "train_args": {{}}}}, file)
from ultralytics import YOLO
YOLO("yolov8n.yaml").save("{tmp_path}/real.pt")
"""
    load = """
import sys
from vigild.plugins.detection.yolo import YoloBackend
try:
    backend = YoloBackend.load(sys.argv[1], None, 0.25, 0.45, "cpu", False)
except Exception as exc:
    print("refused:", type(exc).__name__, exc)
else:
    print("loaded:", backend.task)
"""

    def run(code: str, *args: str, environment: dict[str, str]) -> str:
        done = subprocess.run([sys.executable, "-c", code, *args], env=environment, cwd=tmp_path, capture_output=True,
                              text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    run(make, environment=env)
    assert not ran.exists()
    assert "loaded: detect" in run(load, f"{tmp_path}/real.pt", environment=env)
    assert "refused:" in run(load, f"{tmp_path}/crafted.pt", environment=env)
    assert not ran.exists(), "the crafted checkpoint ran its command under the unit's environment"
    unsafe = {key: value for key, value in env.items() if key != "ULTRALYTICS_SAFE_LOAD"}
    run(load, f"{tmp_path}/crafted.pt", environment=unsafe)
    assert ran.exists(), "the crafted file did not run its command even without safe loading: the test shows nothing"


# --- scripts/install-service.sh ---------------------------------------------------------------------------------------


def _install(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(INSTALL), *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_install_script_syntax_and_help(tmp_path: Path) -> None:
    assert os.access(INSTALL, os.X_OK), "scripts/install-service.sh should be executable"
    syntax = subprocess.run(["bash", "-n", str(INSTALL)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    result = _install("--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for option in ("--prefix", "--unit-dir", "--sysusers-dir", "--destdir", "--no-venv", "--gstreamer"):
        assert option in result.stdout


def test_install_script_stages_under_destdir(tmp_path: Path) -> None:
    stage = tmp_path / "stage"
    result = _install("--destdir", str(stage), "--no-venv", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (stage / "etc/systemd/system/vigild.service").read_text() == UNIT.read_text()
    assert (stage / "usr/lib/sysusers.d/vigild.conf").read_text() == SYSUSERS.read_text()
    config = stage / CONFIG.lstrip("/")
    assert config.read_text().endswith(EXAMPLE.read_text())
    assert config.stat().st_mode & 0o777 == 0o640  # may hold camera credentials
    assert sorted(str(path.relative_to(stage)) for path in stage.rglob("*") if path.is_file()) == [
        "etc/systemd/system/vigild.service",
        "etc/vigild/vigild.yaml",
        "usr/lib/sysusers.d/vigild.conf",
    ]

    # a second run keeps an existing config
    config.write_text("cameras: {}  # mine\n")
    again = _install("--destdir", str(stage), "--no-venv", cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert config.read_text() == "cameras: {}  # mine\n"
    assert "keeping the existing" in again.stdout


def test_install_script_honours_prefix_and_directories(tmp_path: Path) -> None:
    stage = tmp_path / "stage"
    result = _install(
        f"--destdir={stage}",
        "--no-venv",
        "--prefix",
        "/srv/vigild",
        "--unit-dir",
        "/usr/lib/systemd/system",
        "--sysusers-dir",
        "/etc/sysusers.d",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    installed = (stage / "usr/lib/systemd/system/vigild.service").read_text()
    assert installed == UNIT.read_text().replace("/opt/vigild/.venv/", "/srv/vigild/.venv/")
    assert parse_unit(installed)["Service"]["ExecStart"] == [f"/srv/vigild/.venv/bin/vigild run --config {CONFIG}"]
    assert (stage / "etc/sysusers.d/vigild.conf").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--destdir", "stage"], "--no-venv"),  # a venv built in a staging dir would not work once moved
        (["--frobnicate"], "unknown argument"),
        (["--destdir", "stage", "--no-venv", "--prefix", "relative"], "absolute path"),
        (["--destdir", "stage", "--no-venv", "--prefix"], "needs a value"),
    ],
)
def test_install_script_refuses_bad_arguments(tmp_path: Path, args: list[str], message: str) -> None:
    result = _install(*args, cwd=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr
    assert not (tmp_path / "stage").exists()


# --- docs/service.md --------------------------------------------------------------------------------------------------

SERVICE_DOC = ROOT / "docs" / "service.md"


def documented_block(heading: str, index: int = 0) -> str:
    """The `index`-th ```sh block under `heading` in docs/service.md."""
    section = SERVICE_DOC.read_text().split(f"\n{heading}\n", 1)[1].split("\n#", 1)[0]
    return re.findall(r"```sh\n(.*?)```", section, re.S)[index]


@pytest.mark.skipif(os.geteuid() != 0, reason="runs the documented commands as root and reads as other users")
def test_documented_key_commands_let_the_service_user_read_the_secret_and_nobody_else() -> None:
    """The commands docs/service.md gives root for the CURVE keys, run under a temporary /etc with numeric ids for the
    group vigild: a process with the unit's User=/Group= (a uid of its own, primary group vigild) can list the key
    directories and read the server's secret key and the authorised client's public key (what the daemon loads); a
    process of another user can do none of it. Root owns everything, so the daemon cannot change its keys."""
    service_uid, vigild_gid, other = 64101, 64102, 64103  # ids no account here uses: only the numbers matter
    root = Path(
        tempfile.mkdtemp(prefix="vigild-keys-")
    )  # not under pytest's owner-only directory: others must reach it
    try:
        root.chmod(0o755)
        etc = root / "etc"
        etc.mkdir()
        commands = documented_block("### CURVE keys") + documented_block("### CURVE keys", 1)
        assert "/etc/vigild/keys" in commands and "vigild keygen" in commands
        commands = commands.replace("/opt/vigild/.venv/bin/vigild", str(Path(sys.executable).parent / "vigild"))
        commands = commands.replace("/etc/", f"{etc}/").replace("systemctl reload vigild", "true")
        commands = re.sub(r"(-g |chgrp |:)vigild\b", rf"\g<1>{vigild_gid}", commands)
        client = root / "client"
        keygen = [sys.executable, "-m", "vigild", "keygen", "alice", "--dir", str(client)]
        subprocess.run(keygen, check=True, capture_output=True, timeout=60)
        done = subprocess.run(["bash", "-euxc", commands], cwd=client, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr

        keys, authorised = etc / "vigild/keys", etc / "vigild/authorized_keys"
        secret = keys / "server.key_secret"
        assert zmq.auth.load_certificate(secret)[1] is not None
        assert (
            zmq.auth.load_certificate(authorised / "alice.key")[0] == zmq.auth.load_certificate(client / "alice.key")[0]
        )

        def as_user(uid: int, gid: int, *argv: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(argv, user=uid, group=gid, extra_groups=[gid], capture_output=True, text=True,
                                  timeout=60)  # fmt: skip

        for argv in (["cat", str(secret)], ["cat", str(authorised / "alice.key")], ["ls", str(keys), str(authorised)]):
            service = as_user(service_uid, vigild_gid, *argv)
            assert service.returncode == 0, f"the service user cannot run {argv}: {service.stderr}"
            stranger = as_user(other, other, *argv)
            assert stranger.returncode != 0 and "Permission denied" in stranger.stderr, f"another user ran {argv}"
        assert secret.read_text() in as_user(service_uid, vigild_gid, "cat", str(secret)).stdout
        for path in (keys, secret, authorised, authorised / "alice.key"):
            assert path.stat().st_uid == 0 and path.stat().st_mode & 0o022 == 0, f"{path} is not root's alone to change"
    finally:
        shutil.rmtree(root)

"""The systemd integration: systemd/vigild.service, systemd/vigild.sysusers and scripts/install-service.sh.

`systemd-analyze verify` and `systemd-analyze security --offline=yes` work without systemd as PID 1 (they load the
unit the way the manager would, offline), so they run here too; only a missing `systemd-analyze` skips them.
Neither resolves `User=`/`Group=`/`SupplementaryGroups=` (the manager does that when it spawns the service), so
the user vigild need not exist for them. verify exits 0 on a misspelt or unparsable directive and only logs it
("Unknown key ...", "Failed to parse ..."), hence the check that stderr says nothing about the unit at all.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "vigild.service"
SYSUSERS = ROOT / "systemd" / "vigild.sysusers"
INSTALL = ROOT / "scripts" / "install-service.sh"
EXAMPLE = ROOT / "configs" / "test-pattern.yaml"

INSTALLED_VIGILD = "/opt/vigild/.venv/bin/vigild"
CONFIG = "/etc/vigild/vigild.yaml"
GRACEFUL_STOP_S = 10  # the daemon's own bound on a SIGTERM stop

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


# --- what the unit must say -----------------------------------------------------------------------------------------


def test_unit_runs_the_installed_daemon_as_a_notify_service(service: dict[str, list[str]]) -> None:
    assert one(service, "ExecStart") == f"{INSTALLED_VIGILD} run --config {CONFIG}"
    assert one(service, "Type") == "notify"
    assert one(service, "NotifyAccess") == "main"
    assert seconds(one(service, "WatchdogSec")) == 30
    assert re.fullmatch(r"(/usr)?/bin/kill -(s )?(SIG)?HUP \$MAINPID", one(service, "ExecReload"))
    assert one(service, "Restart") == "on-failure"
    assert one(service, "KillSignal") in ("SIGTERM", "TERM", "15")
    assert seconds(one(service, "TimeoutStopSec")) > GRACEFUL_STOP_S


def test_unit_user_directories_and_environment(service: dict[str, list[str]]) -> None:
    assert one(service, "User") == "vigild"
    assert one(service, "Group") == "vigild"
    groups = {group for value in effective(service["SupplementaryGroups"]) for group in value.split()}
    assert {"video", "render"} <= groups
    for kind in ("Runtime", "State", "Configuration"):
        assert one(service, f"{kind}Directory") == "vigild"
    # the control socket lives in $RUNTIME_DIRECTORY: nobody but the service user gets in
    assert int(one(service, "RuntimeDirectoryMode"), 8) & 0o077 == 0
    environment = dict(item.split("=", 1) for value in service["Environment"] for item in shlex.split(value))
    assert environment["YOLO_OFFLINE"] == "1"
    assert environment["YOLO_CONFIG_DIR"] == "/var/lib/vigild/ultralytics"
    assert environment["HOME"] == "/var/lib/vigild"


@pytest.mark.parametrize(
    "key",
    [
        "ProtectHome",
        "PrivateTmp",
        "NoNewPrivileges",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectControlGroups",
        "RestrictNamespaces",
        "LockPersonality",
        "RestrictRealtime",
    ],
)
def test_unit_sandbox_switch_is_on(service: dict[str, list[str]], key: str) -> None:
    assert one(service, key).lower() in TRUE


def test_unit_sandbox(service: dict[str, list[str]]) -> None:
    assert one(service, "ProtectSystem") == "strict"
    assert one(service, "SystemCallArchitectures") == "native"
    assert effective(service["CapabilityBoundingSet"]) == []  # no capabilities at all
    # CUDA's JIT needs writable+executable memory
    assert all(value.lower() not in TRUE for value in service.get("MemoryDenyWriteExecute", []))
    families = [family for value in effective(service["RestrictAddressFamilies"]) for family in value.split()]
    assert not any(family.startswith("~") for family in families), "an allow list, not a deny list"
    # AF_NETLINK: getaddrinfo(AI_ADDRCONFIG)/getifaddrs() and udev enumeration (comment in the unit)
    assert set(families) == {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}


def test_unit_device_access(service: dict[str, list[str]]) -> None:
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


def test_unit_installs_into_multi_user_target(unit: Unit) -> None:
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]
    assert "network-online.target" in " ".join(unit["Unit"]["After"])


# --- sysusers.d ------------------------------------------------------------------------------------------------------


def _sysusers_lines() -> list[list[str]]:
    lines = [line.strip() for line in SYSUSERS.read_text().splitlines()]
    return [shlex.split(line) for line in lines if line and not line.startswith("#")]


def test_sysusers_declares_the_user_and_its_groups() -> None:
    entries = _sysusers_lines()
    users = [entry for entry in entries if entry[0] == "u"]
    assert len(users) == 1
    _, name, uid, _gecos, home, shell = users[0]
    assert (name, uid, home) == ("vigild", "-", "/var/lib/vigild")
    assert shell == "-" or shell.endswith("/nologin")  # "-": systemd's nologin
    assert ["m", "vigild", "video"] in entries
    assert ["m", "vigild", "render"] in entries


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="systemd-sysusers is not installed")
def test_systemd_sysusers_creates_the_user(tmp_path: Path) -> None:
    """Applied to an empty root (works unprivileged): the user, its group, and video/render made as needed."""
    (tmp_path / "etc").mkdir()
    result = subprocess.run(
        ["systemd-sysusers", f"--root={tmp_path}", str(SYSUSERS)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    passwd = {line.split(":")[0]: line.split(":") for line in (tmp_path / "etc/passwd").read_text().splitlines()}
    groups = {line.split(":")[0]: line.split(":") for line in (tmp_path / "etc/group").read_text().splitlines()}
    user = passwd["vigild"]
    assert user[5] == "/var/lib/vigild" and user[6].endswith("/nologin")
    assert user[3] == groups["vigild"][2]  # primary group vigild
    for group in ("video", "render"):
        assert "vigild" in groups[group][3].split(",")


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

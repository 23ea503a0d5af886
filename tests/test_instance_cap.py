"""Control clients cannot multiply plugin instances (issue 29): each distinct per-camera override is an instance
with its own model (a process of its own under `branch: process`), so the instances that control changes may add
beyond the config file's are capped by `control.max_instances`. A change past the cap is `invalid_config` naming
it, the count is in `vigild ctl status`, cameras with the same override share an instance, and the config file
itself is never capped. Against a real `vigild run`, through its control socket."""

from __future__ import annotations

import pytest
from conftest import VTEST, free_endpoint
from service import Service, camera_yaml, service_config
from test_control_security import TEST_SOURCE, control, streaming

pytestmark = pytest.mark.e2e


def camera(delay: float | None = None) -> dict:
    return {"source": TEST_SOURCE, **({"plugins": {"frame_echo": {"delay_s": delay}}} if delay is not None else {})}


def test_distinct_overrides_past_max_instances_are_refused_and_same_ones_share_an_instance(tmp_path):
    cameras = camera_yaml("a", VTEST, loop=True) + camera_yaml(
        "b", TEST_SOURCE, plugins={"frame_echo": {"delay_s": 0.0001}}
    )
    config = service_config(tmp_path, cameras, free_endpoint(), extra="  max_instances: 2\n")
    service = Service(tmp_path, config)
    endpoint = service.control_endpoint

    def counted() -> tuple[dict, int, list[str]]:
        status = control(endpoint, "status")["result"]
        return status["plugin_instances"], status["plugins"]["frame_echo"]["instances"], sorted(status["cameras"])

    def change(action: str, name: str, settings: dict) -> dict:
        return control(endpoint, "cameras", action=action, camera=name, config=settings)

    try:
        streaming(service, "a")
        assert counted() == ({"count": 2, "limit": 4}, 2, ["a", "b"])  # the file's own two, plus two
        assert change("add", "c", camera(0.0002))["ok"]
        for name in ("d", "e"):  # the same override as c, and as a: no new instance, never refused
            assert change("add", name, camera(0.0002 if name == "d" else None))["ok"]
        assert counted() == ({"count": 3, "limit": 4}, 3, ["a", "b", "c", "d", "e"])
        assert change("add", "f", camera(0.0003))["ok"]
        for action, name in (("add", "g"), ("update", "e")):  # a fifth distinct override, new or in place
            reply = change(action, name, camera(0.0004))
            assert not reply["ok"] and reply["error"]["code"] == "invalid_config", reply
            message = reply["error"]["message"]
            assert "control.max_instances: 2" in message and "past the limit of 4" in message, message
        assert change("add", "g", camera(0.0003))["ok"], "f's override: shared"
        assert counted() == ({"count": 4, "limit": 4}, 4, ["a", "b", "c", "d", "e", "f", "g"])
        assert change("update", "f", camera(0.0001))["ok"]  # to b's override: g still holds f's old instance
        assert counted()[0] == {"count": 4, "limit": 4}
        assert control(endpoint, "cameras", action="remove", camera="g")["ok"]
        assert counted()[0] == {"count": 3, "limit": 4}
        assert change("add", "h", camera(0.0004))["ok"], "room again once an instance went"
        code, _ = service.stop()
        assert code == 0
    finally:
        service.kill()


def test_the_config_file_itself_is_never_capped(tmp_path):
    """Five distinct overrides in the file with `max_instances: 0`: the daemon runs them all; a client's sixth is
    refused, while a client's camera sharing one of them is not."""
    cameras = "".join(
        camera_yaml(name, TEST_SOURCE, plugins={"frame_echo": {"delay_s": delay}})
        for name, delay in zip("abcde", (0.0001, 0.0002, 0.0003, 0.0004, 0.0005), strict=True)
    )
    config = service_config(tmp_path, cameras, free_endpoint(), extra="  max_instances: 0\n")
    service = Service(tmp_path, config)
    endpoint = service.control_endpoint
    try:
        streaming(service, "e")
        status = control(endpoint, "status")["result"]
        assert status["plugin_instances"] == {"count": 5, "limit": 5}, status["plugin_instances"]
        assert control(endpoint, "cameras", action="add", camera="f", config=camera(0.0003))["ok"]
        reply = control(endpoint, "cameras", action="add", camera="g", config=camera(0.0009))
        assert not reply["ok"] and reply["error"]["code"] == "invalid_config", reply
        code, _ = service.stop()
        assert code == 0
    finally:
        service.kill()

"""A fixture of Home Assistant's MQTT discovery schema, release 2024.12, written from its documentation (Home Assistant
itself does not install on Python 3.11, so its own voluptuous schemas cannot run here). Only the platforms vigild
uses. Sources, all on home-assistant.io as of 2024.12:

- /integrations/mqtt/#mqtt-discovery: the topic `<discovery_prefix>/<component>/[<node_id>/]<object_id>/config`,
  node and object ids of `[a-zA-Z0-9_-]`; `origin` (`name` required, `sw_version`, `support_url`); `device` needs
  `identifiers` or `connections`; an entity with a `device` needs a `unique_id`; `availability` is a list of
  `{topic (required), payload_available, payload_not_available, value_template}`, `availability_mode` one of
  `all`, `any`, `latest`; an empty retained config removes the entity.
- /integrations/sensor.mqtt/: `state_topic` required; `state_class` one of `measurement`, `total`,
  `total_increasing`.
- /integrations/binary_sensor.mqtt/: `state_topic` required; `payload_on`/`payload_off`; `device_class` from the
  binary sensor device classes (`occupancy`...).
- /integrations/image.mqtt/: exactly one of `image_topic` and `url_topic`; `content_type` (default `image/jpeg`).
- /integrations/switch.mqtt/: `command_topic` required; `state_topic`, `payload_on`/`payload_off`,
  `value_template`.
"""

from __future__ import annotations

import re
from typing import Any

COMMON = {
    "availability": list, "availability_mode": str, "availability_template": str, "availability_topic": str,
    "device": dict, "enabled_by_default": bool, "encoding": str, "entity_category": str, "entity_picture": str,
    "icon": str, "json_attributes_template": str, "json_attributes_topic": str, "name": (str, type(None)),
    "object_id": str, "origin": dict, "qos": int, "unique_id": str,
}  # fmt: skip
PLATFORMS: dict[str, dict[str, Any]] = {
    "sensor": {"required": {"state_topic"}, "keys": {
        "state_topic": str, "device_class": str, "expire_after": int, "force_update": bool,
        "last_reset_value_template": str, "options": list, "state_class": str, "suggested_display_precision": int,
        "unit_of_measurement": str, "value_template": str}},
    "binary_sensor": {"required": {"state_topic"}, "keys": {
        "state_topic": str, "device_class": str, "expire_after": int, "force_update": bool, "off_delay": int,
        "payload_off": str, "payload_on": str, "value_template": str}},
    "image": {"required": set(), "one_of": {"image_topic", "url_topic"}, "keys": {
        "image_topic": str, "url_topic": str, "content_type": str, "image_encoding": str, "url_template": str}},
    "switch": {"required": {"command_topic"}, "keys": {
        "command_topic": str, "command_template": str, "device_class": str, "optimistic": bool,
        "payload_off": str, "payload_on": str, "retain": bool, "state_off": str, "state_on": str,
        "state_topic": str, "value_template": str}},
}  # fmt: skip
DEVICE = {"configuration_url": str, "connections": list, "hw_version": str, "identifiers": (list, str),
          "manufacturer": str, "model": str, "model_id": str, "name": str, "serial_number": str,
          "suggested_area": str, "sw_version": str, "via_device": str}  # fmt: skip
ORIGIN = {"name": str, "sw_version": str, "support_url": str}
AVAILABILITY = {"topic": str, "payload_available": str, "payload_not_available": str, "value_template": str}
STATE_CLASSES = {"measurement", "total", "total_increasing"}
BINARY_DEVICE_CLASSES = {"occupancy", "motion", "presence", "moving", "problem", "running", "connectivity"}
TOPIC = re.compile(r"^(?P<prefix>.+?)/(?P<component>[a-z_]+)/(?:[a-zA-Z0-9_-]+/)?[a-zA-Z0-9_-]+/config$")


def _typed(where: str, payload: dict[str, Any], allowed: dict[str, Any]) -> list[str]:
    problems = [f"{where}: unknown key {key!r}" for key in payload if key not in allowed]
    problems += [
        f"{where}: {key} is {type(value).__name__}"
        for key, value in payload.items()
        if key in allowed and not isinstance(value, allowed[key])
    ]
    return problems


def problems(topic: str, payload: dict[str, Any]) -> list[str]:
    """What the 2024.12 documentation would refuse in this discovery message (empty: none)."""
    match = TOPIC.match(topic)
    if match is None:
        return [f"{topic}: not a discovery config topic"]
    component = match["component"]
    if component not in PLATFORMS:
        return [f"{topic}: no platform {component!r} in this fixture"]
    platform = PLATFORMS[component]
    found = _typed(topic, payload, {**COMMON, **platform["keys"]})
    found += [f"{topic}: {key} is required" for key in platform["required"] if key not in payload]
    if "one_of" in platform and len(platform["one_of"] & set(payload)) != 1:
        found.append(f"{topic}: exactly one of {sorted(platform['one_of'])} is required")
    for key in ("state_topic", "command_topic", "image_topic", "json_attributes_topic"):
        if key in payload and (not payload[key] or "+" in payload[key] or "#" in payload[key]):
            found.append(f"{topic}: {key} {payload[key]!r} is not a topic to publish to")
    if "device" in payload:
        device = payload["device"]
        found += _typed(f"{topic} device", device, DEVICE)
        if not device.get("identifiers") and not device.get("connections"):
            found.append(f"{topic}: device needs identifiers or connections")
        if "unique_id" not in payload:
            found.append(f"{topic}: an entity with a device needs a unique_id")
    if "origin" in payload:
        found += _typed(f"{topic} origin", payload["origin"], ORIGIN)
        if "name" not in payload["origin"]:
            found.append(f"{topic}: origin needs a name")
    for item in payload.get("availability", []):
        found += _typed(f"{topic} availability", item, AVAILABILITY)
        if "topic" not in item:
            found.append(f"{topic}: availability entry without topic")
    if payload.get("availability_mode", "latest") not in ("all", "any", "latest"):
        found.append(f"{topic}: availability_mode {payload['availability_mode']!r}")
    if component == "sensor" and payload.get("state_class", "measurement") not in STATE_CLASSES:
        found.append(f"{topic}: state_class {payload['state_class']!r}")
    if component == "binary_sensor" and payload.get("device_class", "occupancy") not in BINARY_DEVICE_CLASSES:
        found.append(f"{topic}: device_class {payload['device_class']!r}")
    return found

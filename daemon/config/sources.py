"""What a camera's `source:` string means: a file, an RTSP or HTTP stream, a V4L2 device or a test pattern.

Parsed once, at config load, so that a malformed URI or an unknown scheme is a config error naming the camera
instead of a camera that retries forever. Credentials never leave this module in clear: `display` is the
source with any password replaced, for logs and events. Part of the config (the settings validate a `source:`
with it), below capture, which opens what it parsed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from urllib.parse import parse_qsl, quote, unquote, unquote_plus, urlsplit, urlunsplit


class SourceKind(StrEnum):
    FILE = "file"
    RTSP = "rtsp"
    HTTP = "http"
    V4L2 = "v4l2"
    TEST = "test"


TEST_PATTERNS = ("balls", "ball", "smpte", "snow", "checkers-8", "circular", "pinwheel", "spokes", "gradient")
"""`test://<pattern>`: `balls` (default) is several moving balls, something for a detector or tracker to follow;
the others are GStreamer `videotestsrc` patterns."""

_SCHEMES = {"rtsp": SourceKind.RTSP, "rtsps": SourceKind.RTSP, "http": SourceKind.HTTP, "https": SourceKind.HTTP}
_EXPECTED = "a file path, file://, rtsp://, rtsps://, http://, https://, /dev/videoN, a camera index or test://"
_DEVICE = re.compile(r"^/dev/(video\d+|v4l/by-(id|path)/(?!\.\.?$)[^/\s]+)$")
"""A device by number or by its udev link: one name, never a path that climbs out of /dev/v4l (`..`)."""


@dataclass(frozen=True)
class PatternSpec:
    pattern: str = "balls"
    width: int = 640
    height: int = 480
    fps: float = 25.0


@dataclass(frozen=True)
class SourceSpec:
    kind: SourceKind
    uri: str
    """What the back end opens: a URI for streams, an absolute path for files, a device path for V4L2."""
    display: str
    """The source as written, with any password masked: safe for logs, events and the heartbeat."""
    test: PatternSpec = field(default_factory=PatternSpec)

    @property
    def is_live(self) -> bool:
        """Live sources are reconnected when they end; files end (or loop)."""
        return self.kind is not SourceKind.FILE


_SECRET_KEY_PARTS = ("pass", "pwd", "pw", "token", "secret", "key", "auth", "sig", "cred", "session")
"""A query or `;` parameter whose (decoded, lower-cased) name contains one of these is masked: `password`, `pw`,
`access_token`, `api_key`, `apikey`, `sig`, `signature`, `credentials`, `sessionid`, `passphrase`... Over-masking
a harmless `keyframe=` is the price of never showing a secret."""
_USERINFO_HEAD = re.compile(r"://[^\s:/?#@]*:")
_TOKEN = re.compile(r"\S+")
_PARAMETER = re.compile(r"(?P<head>[?&;#](?P<key>[^=?&;#\s]*)=)(?P<value>[^&;#\s]*)")


def _mask_userinfo(token: re.Match[str]) -> str:
    """In one whitespace-free token: from the first `://user:` to the token's last `@`. A password may hold `@`, `/`,
    `:`, `?` or `#` (unencoded, which makes the URI malformed, but the error quoting it must not show it). Linear:
    one search and one `rfind` a token, so a long hostile text costs no more than reading it."""
    text = token.group()
    head = _USERINFO_HEAD.search(text)
    if head is None:
        return text
    at = text.rfind("@")
    return f"{text[: head.end()]}***{text[at:]}" if at >= head.end() else text


def _mask_parameter(match: re.Match[str]) -> str:
    key = unquote_plus(match.group("key")).lower()
    if any(part in key for part in _SECRET_KEY_PARTS):
        return match.group("head") + "***"
    return match.group(0)


def redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    """Mask passwords in any text that may contain URIs: `rtsp://user:secret@host` → `rtsp://user:***@host`,
    `?pwd=secret` → `?pwd=***` (any parameter named like a secret, see `_SECRET_KEY_PARTS`), and every literal in
    `secrets` (a configured password). Never raises."""
    text = _TOKEN.sub(_mask_userinfo, text)
    text = _PARAMETER.sub(_mask_parameter, text)
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***").replace(quote(secret, safe=""), "***")
    return text


def with_credentials(uri: str, username: str | None, password: str | None) -> str:
    """Put configured credentials into a URI (percent-encoded); credentials already in the URI stay if none given."""
    if not username:
        return uri
    parts = urlsplit(uri)
    userinfo = quote(username, safe="") + (":" + quote(password, safe="") if password else "")
    host = parts.netloc.rpartition("@")[2]  # as written: keeps IPv6 brackets and the port
    return urlunsplit(parts._replace(netloc=f"{userinfo}@{host}"))


def parse_source(source: str, base_dir: Path | None = None) -> SourceSpec:
    """Raise `ValueError` with what was expected when `source` is not one of the supported forms.

    `base_dir`: where relative file paths are resolved (the config file's directory); default the working one.
    """
    text = source.strip()
    if not text:
        raise ValueError(f"empty source; expected {_EXPECTED}")
    if text.isdigit():
        device = f"/dev/video{int(text)}"
        return SourceSpec(SourceKind.V4L2, device, device)
    if _DEVICE.match(text):
        return SourceSpec(SourceKind.V4L2, text, text)
    if text.startswith("/dev/"):
        raise ValueError(f"'{text}' is not a video device; expected /dev/videoN")
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):", text)
    if match is None or len(match.group(1)) == 1:  # no scheme (or a Windows drive letter): a file path
        path = Path(text).expanduser()
        if not path.is_absolute():
            path = (base_dir or Path.cwd()) / path
        return SourceSpec(SourceKind.FILE, str(path), text)
    scheme = match.group(1).lower()
    if scheme == "test":
        return _parse_test(text)
    if scheme == "file":
        parts = urlsplit(text)
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise ValueError(f"malformed file URI '{_masked_source(text)}'; expected file:///absolute/path")
        return SourceSpec(SourceKind.FILE, unquote(parts.path), text)
    kind = _SCHEMES.get(scheme)
    if kind is None:
        raise ValueError(f"unknown source scheme '{scheme}://'; expected {_EXPECTED}")
    return SourceSpec(kind, _check_url(text, scheme), redact(text))


_SOURCE_USERINFO = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:/*[^:/?#@]*:")


def _masked_source(text: str) -> str:
    """One source string for an error message: `redact`, and also a password with whitespace in it masked
    (everything from `scheme://user:` to the string's last `@`)."""
    head, at = _SOURCE_USERINFO.match(text), text.rfind("@")
    if head is not None and at >= head.end():
        text = f"{text[: head.end()]}***{text[at:]}"
    return redact(text)


def _check_url(text: str, scheme: str) -> str:
    shown = _masked_source(text)
    if not text.lower().startswith(f"{scheme}://"):
        raise ValueError(f"malformed URI '{shown}'; expected {scheme}://host[:port]/path")
    if any(c.isspace() for c in text):
        raise ValueError(f"malformed URI '{shown}': contains whitespace (percent-encode it as %20)")
    parts = urlsplit(text)
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"malformed URI '{shown}': the port is not a number from 1 to 65535") from None
    if not parts.hostname:
        raise ValueError(f"malformed URI '{shown}': no host; expected {scheme}://host[:port]/path")
    if port == 0:
        raise ValueError(f"malformed URI '{shown}': the port is not a number from 1 to 65535")
    return text


def _parse_test(text: str) -> SourceSpec:
    parts = urlsplit(text)
    pattern = parts.netloc or parts.path.strip("/") or "balls"
    if "@" in pattern:
        raise ValueError("test:// takes no user or password; expected test://<pattern>")
    if pattern not in TEST_PATTERNS:
        raise ValueError(f"unknown test pattern '{pattern}'; expected one of {', '.join(TEST_PATTERNS)}")
    values: dict[str, float] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key not in ("width", "height", "fps"):
            raise ValueError(f"unknown test:// parameter '{key}'; expected width, height or fps")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"test:// parameter {key}={value!r}: expected a number") from None
        if not (0 < number <= (1000 if key == "fps" else 8192)) or (key != "fps" and number != int(number)):
            raise ValueError(f"test:// parameter {key}={value}: out of range")
        values[key] = number
    test = PatternSpec(
        pattern,
        int(values.get("width", 640)),
        int(values.get("height", 480)),
        values.get("fps", 25.0),
    )
    return SourceSpec(SourceKind.TEST, text, text, test)

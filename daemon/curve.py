"""ZeroMQ CURVE for the publisher and the control socket: server keys, the authorised-clients directory, client keys.

Keys are ZeroMQ certificate files as `zmq.auth.create_certificates` writes them (`NAME.key` public,
`NAME.key_secret` both halves), so they work with any ZeroMQ tool. Clients are checked by ZAP through pyzmq's
thread authenticator: a client whose public key is not in the directory never completes the handshake, so it
receives nothing and can send nothing. The directory is read again on every reload: the keys that can be read
then are the authorised set (a file that is not a key is skipped and logged, never a reason to keep old keys).

Below everything that uses it: the publisher and the replay socket (vigild.outputs), the control socket
(vigild.service.control), the client (vigild.client) and `vigild keygen`.
"""

from __future__ import annotations

import datetime
import errno
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import zmq
import zmq.auth

log = logging.getLogger("vigild.curve")


class CurveSettings(Protocol):
    """What the server side reads of the config's `curve:` section (vigild.config.settings.CurveConfig): a
    protocol, so that this module sits below the config and clients load keys without the daemon's config models."""

    @property
    def secret_key(self) -> Path: ...

    @property
    def authorized_keys(self) -> Path: ...


def keygen(directory: Path, name: str) -> tuple[Path, Path]:
    """Write a key pair as NAME.key (public, to hand out) and NAME.key_secret (keep private, mode 0600).

    The secret is created with mode 0600 rather than chmodded afterwards, so no other user can open it at any
    moment, whatever the umask. Neither file may exist yet: a key pair in use is never replaced by accident
    (FileExistsError naming the file; remove it to make a new pair).
    """
    directory.mkdir(parents=True, exist_ok=True)
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    for path in (public, secret):
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, "a key file is there already (remove it to make a new pair)", str(path))
    public_key, secret_key = (key.decode() for key in zmq.curve_keypair())
    now = datetime.datetime.now().isoformat(sep=" ", timespec="seconds")
    curve = f'curve\n    public-key = "{public_key}"\n'
    _create(secret, 0o600, _SECRET_BANNER.format(now) + curve + f'    secret-key = "{secret_key}"\n')
    try:
        _create(public, 0o644, _PUBLIC_BANNER.format(now) + curve)
    except OSError:
        secret.unlink()  # no half pair left behind
        raise
    return public, secret


# ZeroMQ's certificate format (ZPL), as zmq.auth.create_certificates and czmq write it
_SECRET_BANNER = """#   ****  Generated on {} by vigild keygen  ****
#   ZeroMQ CURVE **Secret** Certificate
#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions.

metadata
"""
_PUBLIC_BANNER = """#   ****  Generated on {} by vigild keygen  ****
#   ZeroMQ CURVE Public Certificate
#   Exchange securely, or use a secure mechanism to verify the contents of this file after exchange.

metadata
"""


def _create(path: Path, mode: int, text: str) -> None:
    """Write a new file that has at most `mode` from the moment it exists (O_EXCL: not over an existing file, nor
    through a symlink planted in its place)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        file.write(text)


@dataclass(frozen=True)
class ClientKeys:
    """What a client needs: the server's public key and its own pair."""

    server_public: bytes
    public: bytes
    secret: bytes

    @classmethod
    def load(cls, server_key: str | Path, client_secret_key: str | Path) -> ClientKeys:
        server_public, _ = zmq.auth.load_certificate(server_key)
        public, secret = zmq.auth.load_certificate(client_secret_key)
        if secret is None:
            raise ValueError(f"{client_secret_key} holds no secret key (give the .key_secret file)")
        return cls(server_public, public, secret)

    def apply(self, socket: zmq.Socket) -> None:
        socket.curve_serverkey = self.server_public
        socket.curve_publickey = self.public
        socket.curve_secretkey = self.secret


class CurveServer:
    """One authenticator per ZeroMQ context (ZAP is per context); `secure(socket)` before `bind`."""

    def __init__(self, config: CurveSettings, context: zmq.Context):
        from zmq.auth.thread import ThreadAuthenticator

        self.config = config
        self.public, secret = zmq.auth.load_certificate(config.secret_key)
        assert secret is not None  # checked when the config was validated
        self._secret = secret
        self._authorised: frozenset[bytes] = frozenset()
        self._auth = ThreadAuthenticator(context, log=logging.getLogger("vigild.curve.zap"))
        self._auth.start()
        self.reload_keys()
        # asked on the authenticator's thread for each handshake; never ZeroMQ's configure_curve(location), which
        # keeps the previous keys, removed ones included, when a single file in the directory cannot be read
        self._auth.configure_curve_callback(domain="*", credentials_provider=self)

    def callback(self, domain: str, client_key: bytes) -> bool:
        """ZAP: whether the client's public key (Z85) is authorised."""
        return client_key in self._authorised

    def reload_keys(self) -> None:
        """(Re-)read the authorised keys directory: keys added or removed take effect for new connections (those
        already connected stay). Files that hold no public key are skipped with an error naming them."""
        directory = Path(self.config.authorized_keys)
        keys: set[bytes] = set()
        for file in sorted(directory.glob("*.key")):
            try:
                public, _ = zmq.auth.load_certificate(file)
            except (OSError, ValueError) as exc:
                log.error("CURVE: %s is not a public key, skipped (its client cannot connect): %s", file, exc)
                continue
            keys.add(public)
        self._authorised = frozenset(keys)  # one assignment: a handshake sees the old set or the new one
        log.info("CURVE: %d authorised client key(s) in %s", len(keys), directory)

    def secure(self, socket: zmq.Socket) -> None:
        socket.curve_secretkey = self._secret
        socket.curve_publickey = self.public
        socket.curve_server = True

    def stop(self) -> None:
        self._auth.stop()


def bind_secured(
    socket: zmq.Socket, endpoint: str, config: CurveSettings | None, context: zmq.Context
) -> CurveServer | None:
    """Secure `socket` with CURVE (`config`; None: plain) and bind it to `endpoint`; return the CurveServer (to
    reload keys and stop), or close the socket, stop what was started and raise (zmq.ZMQError, OSError,
    ValueError) when it cannot bind."""
    curve = None
    try:
        if config is not None:
            curve = CurveServer(config, context)
            curve.secure(socket)
        socket.bind(endpoint)
    except BaseException:
        socket.close(linger=0)
        if curve is not None:
            curve.stop()
        raise
    return curve

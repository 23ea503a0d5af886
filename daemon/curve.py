"""ZeroMQ CURVE for the publisher and the control socket: server keys, the authorised-clients directory, client keys.

Keys are ZeroMQ certificate files as `zmq.auth.create_certificates` writes them (`NAME.key` public,
`NAME.key_secret` both halves), so they work with any ZeroMQ tool. Clients are checked by ZAP through pyzmq's
thread authenticator: a client whose public key is not in the directory never completes the handshake, so it
receives nothing and can send nothing. The directory is read again on every reload: the keys that can be read
then are the authorised set (a file that is not a key is skipped and logged, never a reason to keep old keys).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import zmq
import zmq.auth

if TYPE_CHECKING:  # clients load keys without the daemon's config models
    from vigild.config import CurveConfig

log = logging.getLogger("vigild.curve")


def keygen(directory: Path, name: str) -> tuple[Path, Path]:
    """Write a key pair as NAME.key (public, to hand out) and NAME.key_secret (keep private, mode 0600)."""
    directory.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(directory, name)
    Path(secret).chmod(0o600)
    return Path(public), Path(secret)


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

    def __init__(self, config: CurveConfig, context: zmq.Context):
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

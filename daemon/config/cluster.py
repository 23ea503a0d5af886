"""The `cluster:` section: daemons that share one camera list through NATS JetStream leases (docs/cluster.md), and
what the NATS output shares with it (one connection, one set of credentials)."""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

BUCKET = r"^[A-Za-z0-9_-]{1,48}$"


def nats_url(value: str) -> str:
    """`nats://host[:port]` or `tls://host[:port]`, a comma-separated list of them (a cluster's seeds)."""
    for one in value.split(","):
        parts = urlsplit(one.strip())
        if parts.scheme not in ("nats", "tls"):
            raise ValueError("expected nats://host[:port] or tls://host[:port] (several: comma-separated)")
        if parts.username or parts.password:
            raise ValueError("give the credentials as `username` and `password` (or `creds`), not in the URL")
        try:
            port = parts.port
        except ValueError:
            raise ValueError("the port is not a number from 1 to 65535") from None
        if not parts.hostname or port == 0 or parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError("expected nats://host[:port] without path or query")
    return value


def default_member_name() -> str:
    """The host name (a Kubernetes pod's name): what `vigild cluster status` shows for this daemon."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname().split(".")[0])[:64] or "host"


class NatsServer(BaseModel):
    """Where a NATS server is and how to log in: shared by `cluster:` and the `nats` output."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    username: str | None = Field(None, description="Use ${VAR} to take it from the environment.")
    password: SecretStr | None = Field(None, description="Use ${VAR} to take it from the environment; never shown.")
    creds: Path | None = Field(None, description="A NATS credentials file (JWT and NKey seed), instead of a password.")

    @model_validator(mode="after")
    def _credentials(self) -> NatsServer:
        if self.password is not None and self.username is None:
            raise ValueError("a `password` needs a `username`")
        if self.creds is not None and self.username is not None:
            raise ValueError("give `creds` or `username`/`password`, not both")
        return self

    def login(self) -> tuple[str | None, str | None, str | None]:
        """(username, password, creds file): the key under which one connection is shared."""
        password = self.password.get_secret_value() if self.password is not None else None
        return self.username, password, str(self.creds) if self.creds is not None else None


class ClusterConfig(NatsServer):
    """Run as one of N identical daemons sharing the cameras (docs/cluster.md)."""

    nats: str = Field(description="The NATS server(s): `nats://host[:port]`, comma-separated for several.")
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")] = Field(
        default_factory=default_member_name,
        description="This daemon's name in the cluster; default: the host name. Two daemons with one name are two "
        "members (a member is its name and its run id).",
    )
    capacity: int = Field(64, ge=0, le=100_000, description="Cameras this daemon holds at most.")
    lease_ttl_s: float = Field(
        10.0, ge=2, le=600, description="Seconds a lease (and a member's registration) lives without renewal: a dead "
        "daemon's cameras move after about this long."
    )  # fmt: skip
    renew_fraction: float = Field(
        0.25, gt=0, le=0.5, description="Leases are renewed every `lease_ttl_s` times this."
    )
    fence_margin_s: float = Field(
        1.0, ge=0, le=60, description="A daemon stops publishing a camera's events this long before its lease could "
        "expire on the server: the clock difference between hosts it tolerates (docs/cluster.md#fencing)."
    )  # fmt: skip
    bucket_prefix: Annotated[str, Field(pattern=BUCKET)] = Field(
        "vigild", description="The key-value buckets are `<prefix>_members` and `<prefix>_leases`."
    )
    replicas: int = Field(1, ge=1, le=5, description="Replicas of the key-value buckets (3 on a 3-server cluster).")

    @field_validator("nats")
    @classmethod
    def _url(cls, value: str) -> str:
        return nats_url(value)

    @model_validator(mode="after")
    def _times(self) -> ClusterConfig:
        if self.fence_margin_s >= self.lease_ttl_s * (1 - self.renew_fraction) - 0.5:
            raise ValueError(f"`fence_margin_s` ({self.fence_margin_s}) leaves no time to renew a lease of "
                             f"{self.lease_ttl_s} s: make it smaller, or `lease_ttl_s` larger")  # fmt: skip
        return self

    @property
    def renew_s(self) -> float:
        return self.lease_ttl_s * self.renew_fraction

    def describe(self) -> str:
        user = f" as {self.username}" if self.username else (" with a creds file" if self.creds else "")
        return (f"cluster member {self.name} on {self.nats}{user}: up to {self.capacity} cameras, leases of "
                f"{self.lease_ttl_s:g} s in {self.bucket_prefix}_leases")  # fmt: skip

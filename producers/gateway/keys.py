"""API keys -> tenants. The tenant of a call is its key's, never its body's.

The file holds one `TENANT KEY` or `TENANT sha256:HEX` per line (`#` starts a
comment). Keys are kept only as SHA-256 digests, so a file of digests is not
a secret, and a presented key is looked up by its digest: the lookup takes
the same time whichever key, right or wrong, is presented."""

from __future__ import annotations

import hashlib
import secrets
from pathlib import Path

from schemas.topics import check_topic_name


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh API key (256 bits, URL-safe)."""
    return "sk-sluice-" + secrets.token_urlsafe(32)


class ApiKeys:
    def __init__(self, tenants_by_digest: dict[str, str]) -> None:
        self._by_digest = dict(tenants_by_digest)

    def __len__(self) -> int:
        return len(self._by_digest)

    @classmethod
    def load(cls, path: Path, setting: str = "SLUICE_GATEWAY_API_KEYS_FILE") -> ApiKeys:
        try:
            text = path.read_text()
        except OSError as exc:
            raise ValueError(f"{setting}={str(path)!r}: cannot read it ({exc.strerror})") from None
        by_digest: dict[str, str] = {}
        for n, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{setting} line {n}: expected `TENANT KEY` or `TENANT sha256:HEX`")
            tenant, key = parts
            try:
                check_topic_name(tenant)  # a tenant may name topics (tenant-topic mode)
            except ValueError as exc:
                raise ValueError(f"{setting} line {n}: tenant {exc}") from None
            if key.startswith("sha256:"):
                hexdigest = key.removeprefix("sha256:").lower()
                if len(hexdigest) != 64 or set(hexdigest) - set("0123456789abcdef"):
                    raise ValueError(f"{setting} line {n}: sha256: takes 64 hex digits")
            else:
                hexdigest = digest(key)
            by_digest[hexdigest] = tenant
        if not by_digest:
            raise ValueError(f"{setting}={str(path)!r}: no keys in it")
        return cls(by_digest)

    def tenant_of(self, authorization: str | None) -> str | None:
        """The tenant of an `Authorization: Bearer KEY` header, or None."""
        if not authorization:
            return None
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return None
        return self._by_digest.get(digest(key.strip()))

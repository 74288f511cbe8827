"""Secrets and TLS material of the secure local stack (`sluice up --secure`).

Everything lives under `<state>/secrets/` (mode 0700), each secret in a file
of its own (mode 0600), made once and reused on every restart, so the files
that workers and clients point at (the env files name them) stay valid:

    <state>/secrets/<name>.password    random passwords (secrets.token_urlsafe)
    <state>/secrets/ca.p12             the local CA's key pair (self-signed, bc:c)
    <state>/secrets/broker.p12         the broker's key pair, signed by the CA (keystore)
    <state>/secrets/truststore.p12     the CA's certificate (the broker trusts itself through it)
    <state>/secrets/ca.pem             the CA's certificate for clients (SLUICE_KAFKA_SSL_CAFILE)

Passwords reach keytool through `-storepass:file` and never a command line,
and no function here logs or raises with a secret in its message.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from sluice.errors import StackError

_DIR_MODE = 0o700
_FILE_MODE = 0o600
_KEYTOOL_TIMEOUT_S = 60.0
_CA_VALIDITY_DAYS = 3650
# Browsers and some TLS stacks refuse leaf certificates valid longer than this.
_BROKER_VALIDITY_DAYS = 825
# Names the broker's certificate answers to: clients connect to 127.0.0.1
# (the advertised listener) and may also say localhost.
_BROKER_SAN = "SAN=ip:127.0.0.1,dns:localhost"
_KEY = ("-keyalg", "EC", "-groupname", "secp256r1")  # fast to make; Java and OpenSSL both speak it


def private_dir(path: Path) -> Path:
    """`path` as a folder only its owner can enter (made if missing, tightened if not)."""
    path.mkdir(parents=True, exist_ok=True, mode=_DIR_MODE)
    path.chmod(_DIR_MODE)
    return path


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path` with mode 0600 from the first byte.

    Through a temporary file renamed over the target, so the file is never
    readable by others (not even between create and chmod) and a reader
    never sees half of it.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    tmp.replace(path)


class StackSecrets:
    """The secure stack's passwords and key stores under `<state>/secrets/`."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / "secrets"
        self.ca_store = self.dir / "ca.p12"
        self.keystore = self.dir / "broker.p12"
        self.truststore = self.dir / "truststore.p12"
        self.ca_pem = self.dir / "ca.pem"

    def password_file(self, name: str) -> Path:
        return self.dir / f"{name}.password"

    def password(self, name: str, *, create: bool = True, hint: str = "") -> str:
        """The password `name`, made (random, 256 bits) on first use and kept in its file.

        `create=False` where something already holds the password (a running
        server, a formatted data folder): a new one would only fail to log
        in, after the whole start timeout, so say so at once (with `hint`).
        """
        path = self.password_file(name)
        try:
            value = path.read_text().strip()
        except FileNotFoundError:
            value = ""
        if not value and not create:
            raise StackError(f"{path} is missing or empty{': ' + hint if hint else ''}")
        if not value:
            private_dir(self.dir)
            value = secrets.token_urlsafe(32)  # [A-Za-z0-9_-]: safe in JAAS and --add-scram syntax
            write_private(path, value + "\n")
        return value

    def pki_ready(self) -> bool:
        """The stores and the passwords that open them are all there (else all are made anew)."""
        made = (self.ca_store, self.keystore, self.truststore, self.ca_pem)
        keys = (self.password_file(name) for name in ("ca", "keystore", "truststore"))
        return all(p.is_file() for p in (*made, *keys))

    def ensure_pki(self, keytool: str, log: Callable[[str], None]) -> None:
        """Make the CA, the broker's key pair and the stores, unless made before.

        Made in a scratch folder and moved in only when every step succeeded,
        so a failed run leaves nothing that looks complete.
        """
        if self.pki_ready():
            return
        private_dir(self.dir)
        scratch = private_dir(self.dir / ".pki.partial")
        log(f"kafka: making a local CA and the broker's certificate in {self.dir} (first time only)")
        try:
            ca_pass = self.password_file("ca")
            store_pass = self.password_file("keystore")
            trust_pass = self.password_file("truststore")
            for path in (ca_pass, store_pass, trust_pass):
                path.unlink(missing_ok=True)  # new stores, new passwords
            for name in ("ca", "keystore", "truststore"):
                self.password(name)
            ca, broker, trust = scratch / "ca.p12", scratch / "broker.p12", scratch / "truststore.p12"
            pem, csr, crt = scratch / "ca.pem", scratch / "broker.csr", scratch / "broker.crt"

            def run(*args: str) -> None:
                _keytool(keytool, list(args))

            # The CA: self-signed, marked as a CA (basic constraints ca:true).
            run("-genkeypair", "-alias", "ca", *_KEY, "-dname", "CN=sluice local CA", "-ext", "bc:c",
                "-validity", str(_CA_VALIDITY_DAYS), "-keystore", str(ca), "-storetype", "PKCS12",
                "-storepass:file", str(ca_pass))  # fmt: skip
            run("-exportcert", "-rfc", "-alias", "ca", "-keystore", str(ca), "-storepass:file", str(ca_pass),
                "-file", str(pem))  # fmt: skip
            # The broker's key pair, then its certificate signed by the CA.
            run("-genkeypair", "-alias", "broker", *_KEY, "-dname", "CN=localhost", "-ext", _BROKER_SAN,
                "-validity", str(_BROKER_VALIDITY_DAYS), "-keystore", str(broker), "-storetype", "PKCS12",
                "-storepass:file", str(store_pass))  # fmt: skip
            run("-certreq", "-alias", "broker", "-keystore", str(broker), "-storepass:file", str(store_pass),
                "-file", str(csr))  # fmt: skip
            run("-gencert", "-rfc", "-alias", "ca", "-keystore", str(ca), "-storepass:file", str(ca_pass),
                "-infile", str(csr), "-outfile", str(crt), "-ext", _BROKER_SAN,
                "-ext", "eku=serverAuth,clientAuth", "-validity", str(_BROKER_VALIDITY_DAYS))  # fmt: skip
            # The chain into the keystore: the CA first, so keytool accepts the signed reply.
            run("-importcert", "-noprompt", "-alias", "ca", "-file", str(pem), "-keystore", str(broker),
                "-storepass:file", str(store_pass))  # fmt: skip
            run("-importcert", "-noprompt", "-alias", "broker", "-file", str(crt), "-keystore", str(broker),
                "-storepass:file", str(store_pass))  # fmt: skip
            # The truststore: the CA alone. The broker needs it as the client of
            # its own inter-broker listener (transaction markers go over it).
            run("-importcert", "-noprompt", "-alias", "ca", "-file", str(pem), "-keystore", str(trust),
                "-storetype", "PKCS12", "-storepass:file", str(trust_pass))  # fmt: skip
            for made, final in ((ca, self.ca_store), (broker, self.keystore), (trust, self.truststore)):
                made.chmod(_FILE_MODE)
                made.replace(final)
            # The CA certificate is public; clients of other users may need to read it.
            pem.chmod(0o644)
            pem.replace(self.ca_pem)  # last: its presence completes pki_ready()
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def _keytool(keytool: str, args: list[str]) -> None:
    """One keytool command; StackError with its output (keytool never echoes a password)."""
    try:
        done = subprocess.run(
            [keytool, *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=_KEYTOOL_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as exc:
        raise StackError(f"keytool {args[0]} did not finish within {_KEYTOOL_TIMEOUT_S:g} s") from exc
    if done.returncode != 0:
        output = " ".join((done.stdout + done.stderr).split())
        raise StackError(f"keytool {args[0]} failed (exit {done.returncode}): {output}")


def redis_acl(user: str, password_sha256: str) -> str:
    """The secure redis-server's ACL file: no default user, one user for Sluice.

    The worker's cache needs GET/MGET, SET with EX through a Lua script
    (EVALSHA, falling back to SCRIPT LOAD/EVAL), PING and connection commands;
    `-@dangerous` leaves out what no cache client should run (FLUSHALL,
    CONFIG, KEYS, DEBUG, SHUTDOWN, ACL, MONITOR...).
    """
    return f"user default off\nuser {user} on #{password_sha256} ~* &* +@all -@dangerous\n"

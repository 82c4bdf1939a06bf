"""TLS and basic auth for the HTTP endpoints, from an exporter-toolkit web-config file.

Prometheus exporters share one YAML format for this (`--web.config.file`,
https://github.com/prometheus/exporter-toolkit/blob/master/docs/web-configuration.md),
so operators and their tooling (htpasswd -nBC 10, cert-manager secrets) work
unchanged. We accept the subset uvicorn can honour:

    tls_server_config:
      cert_file: server.crt
      key_file: server.key
      client_ca_file: ca.crt            # optional: mutual TLS
      client_auth_type: RequireAndVerifyClientCert
    basic_auth_users:
      alice: $2y$10$...                 # bcrypt hashes only

Any other key fails loudly at startup rather than being silently ignored: a
security setting that does nothing is worse than an error. Unlike the Go
toolkit, the file is read once at startup (restart to rotate certificates).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import ssl
import threading
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.to_thread
import bcrypt
import yaml
from starlette.types import ASGIApp, Receive, Scope, Send

#: Paths served without credentials: the liveness probe must work for the
#: kubelet, which cannot send basic auth on httpGet probes without a secret.
UNAUTHENTICATED_PATHS = frozenset({"/healthz"})

TLS_KEYS = {"cert_file", "key_file", "client_ca_file", "client_auth_type"}
#: exporter-toolkit keys we know but cannot honour with uvicorn.
UNSUPPORTED = {
    "tls_server_config": {"cert", "key", "client_ca", "min_version", "max_version", "cipher_suites",
                          "curve_preferences", "prefer_server_cipher_suites", "client_allowed_sans"},
    "top": {"http_server_config", "rate_limit"},
}
CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "RequestClientCert": ssl.CERT_OPTIONAL,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAnyClientCert": ssl.CERT_REQUIRED,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}


class WebConfigError(ValueError):
    """A web-config problem, as one line that names the file and the key."""


@dataclass(frozen=True)
class TLSConfig:
    cert_file: str
    key_file: str
    client_ca_file: str | None = None
    cert_reqs: int = ssl.CERT_NONE


@dataclass(frozen=True)
class WebConfig:
    tls: TLSConfig | None = None
    #: user name -> bcrypt hash (bytes); empty means no authentication.
    users: dict[str, bytes] = field(default_factory=dict)


def load_web_config(path: str) -> WebConfig:
    """Read and validate the file; raises WebConfigError with one line."""

    def fail(what: str) -> WebConfigError:
        return WebConfigError(f"web config {path}: {what}")

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise fail(f"cannot read it: {exc.strerror or type(exc).__name__}") from None
    except UnicodeDecodeError:
        raise fail("not UTF-8 text") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise fail(f"not valid YAML{where}: {problem}") from None
    if data is None:
        return WebConfig()
    if not isinstance(data, dict):
        raise fail("must be a YAML mapping with tls_server_config and/or basic_auth_users")
    base = os.path.dirname(os.path.abspath(path))
    for key in data:
        if key in UNSUPPORTED["top"]:
            raise fail(f"{key} is not supported by celery-signal-exporter")
        if key not in ("tls_server_config", "basic_auth_users"):
            raise fail(f"unknown key {str(key)!r} (expected tls_server_config, basic_auth_users)")
    tls = _tls(data.get("tls_server_config"), base, fail)
    users = _users(data.get("basic_auth_users"), fail)
    return WebConfig(tls=tls, users=users)


def _tls(section: Any, base: str, fail: Any) -> TLSConfig | None:
    if section is None:
        return None
    if not isinstance(section, dict):
        raise fail("tls_server_config must be a mapping")
    for key in section:
        if key in UNSUPPORTED["tls_server_config"]:
            raise fail(f"tls_server_config.{key} is not supported by celery-signal-exporter")
        if key not in TLS_KEYS:
            raise fail(f"unknown key 'tls_server_config.{key}'")
    files: dict[str, str] = {}
    for key in ("cert_file", "key_file", "client_ca_file"):
        value = section.get(key)
        if value is None:
            continue
        if not isinstance(value, str) or not value:
            raise fail(f"tls_server_config.{key} must be a file name")
        # Relative to the config file, as exporter-toolkit resolves them.
        full = os.path.join(base, value)
        if not os.path.isfile(full):
            raise fail(f"tls_server_config.{key} {full} does not exist")
        files[key] = full
    if "cert_file" not in files or "key_file" not in files:
        raise fail("tls_server_config needs both cert_file and key_file")
    auth_type = section.get("client_auth_type", "NoClientCert")
    if auth_type not in CLIENT_AUTH:
        raise fail(f"tls_server_config.client_auth_type must be one of {', '.join(CLIENT_AUTH)}")
    if CLIENT_AUTH[auth_type] != ssl.CERT_NONE and "client_ca_file" not in files:
        raise fail(f"tls_server_config.client_auth_type {auth_type} needs client_ca_file")
    # Load them now, one by one, so a bad file is named here rather than in a
    # uvicorn traceback (OpenSSL's own reasons, "PEM lib", help nobody).
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    for key in ("cert_file", "client_ca_file"):
        if key in files and not _has_pem_certificate(files[key]):
            raise fail(f"tls_server_config.{key} {files[key]} holds no PEM certificate")
    try:
        context.load_cert_chain(files["cert_file"], files["key_file"])
    except (ssl.SSLError, OSError):
        raise fail(f"tls_server_config.key_file {files['key_file']} is not an unencrypted PEM private key "
                   "matching cert_file") from None
    if "client_ca_file" in files:
        try:
            context.load_verify_locations(files["client_ca_file"])
        except (ssl.SSLError, OSError):
            raise fail(f"tls_server_config.client_ca_file {files['client_ca_file']} cannot be loaded") from None
    return TLSConfig(files["cert_file"], files["key_file"], files.get("client_ca_file"), CLIENT_AUTH[auth_type])


def _has_pem_certificate(path: str) -> bool:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            text = f.read()
        start = text.index("-----BEGIN CERTIFICATE-----")
        end = text.index("-----END CERTIFICATE-----", start) + len("-----END CERTIFICATE-----")
        ssl.PEM_cert_to_DER_cert(text[start:end])
    except (OSError, ValueError):
        return False
    return True


def _users(section: Any, fail: Any) -> dict[str, bytes]:
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise fail("basic_auth_users must be a mapping of user name to bcrypt hash")
    users: dict[str, bytes] = {}
    for user, hashed in section.items():
        if not isinstance(user, str) or not user or ":" in user:
            raise fail("basic_auth_users: user names must be non-empty strings without ':'")
        if not isinstance(hashed, str) or not _is_bcrypt(hashed):
            # Never echo the value: it may be a plain-text password by mistake.
            raise fail(f"basic_auth_users.{user} is not a bcrypt hash (make one with htpasswd -nBC 10 '' | tr -d ':')")
        users[user] = hashed.encode("ascii")
    return users


def _is_bcrypt(value: str) -> bool:
    if len(value) != 60 or value[:4] not in ("$2a$", "$2b$", "$2y$") or value[6] != "$":
        return False
    try:
        bcrypt.checkpw(b"", value.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        return False
    return True


def _cost(hashed: bytes) -> int:
    """The work factor of a bcrypt hash (`$2b$12$...` -> 12)."""
    return int(hashed[4:6])


class BasicAuth:
    """ASGI middleware: HTTP basic auth against bcrypt hashes.

    bcrypt is deliberately slow (tens to hundreds of ms), so checks run in
    threads of their own (half the cores, at least one), never in the pool
    that renders /metrics: a password guesser cannot starve scrapes. A
    successful (user, password) pair is remembered by its SHA-256, one per
    user, as exporter-toolkit does, so that scrapes every few seconds do not
    burn a core; a failure never is.

    A failure must not tell which users exist: every check runs one bcrypt
    of a real user's cost. An unknown name is checked against a dummy hash of
    the cost of a user picked by a keyed digest of the name (so a name always
    costs the same, and the costs unknown names show are the users' own), and
    a password over the 72 bytes bcrypt takes is still run, cut to 72,
    before it is refused.
    """

    def __init__(self, app: ASGIApp, users: dict[str, bytes], realm: str = "celery-signal-exporter") -> None:
        self.app = app
        self.users = users
        self.challenge = f'Basic realm="{realm}", charset="UTF-8"'.encode()
        self._costs = sorted(_cost(hashed) for hashed in users.values())
        self._dummies = {cost: bcrypt.hashpw(os.urandom(16).hex().encode(), bcrypt.gensalt(cost))
                         for cost in set(self._costs)}
        self._key = os.urandom(32)
        self._verified: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._threads = max(1, (os.cpu_count() or 2) // 2)
        self._limiter: anyio.CapacityLimiter | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in UNAUTHENTICATED_PATHS:
            await self.app(scope, receive, send)
            return
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        if await self._allowed(header):
            await self.app(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"www-authenticate", self.challenge), (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", b"13")]})
        await send({"type": "http.response.body", "body": b"Unauthorized\n"})

    async def _allowed(self, header: bytes) -> bool:
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"basic":
            return False
        try:
            decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return False
        user, colon, password = decoded.partition(":")
        if not colon:
            return False
        key = hashlib.sha256(decoded.encode("utf-8", "surrogatepass")).digest()
        with self._lock:
            if hmac.compare_digest(self._verified.get(user, b""), key):
                return True
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self._threads)
        ok = await anyio.to_thread.run_sync(self._check, user, password, limiter=self._limiter)
        if ok:
            with self._lock:
                self._verified[user] = key  # one per user: bounded by the users configured
        return ok

    def _hash_for(self, user: str) -> tuple[bytes, bool]:
        """The hash to check `user` against, and whether it is theirs."""
        hashed = self.users.get(user)
        if hashed is not None:
            return hashed, True
        digest = hmac.new(self._key, user.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()
        cost = self._costs[int.from_bytes(digest[:8], "big") % len(self._costs)]
        return self._dummies[cost], False

    def _check(self, user: str, password: str) -> bool:
        hashed, real = self._hash_for(user)
        secret = password.encode("utf-8", "surrogatepass")
        fits = len(secret) <= 72  # bcrypt >= 5 refuses longer ones: they never match, but cost the same
        try:
            matched = bcrypt.checkpw(secret[:72], hashed)
        except ValueError:
            return False
        return matched and real and fits

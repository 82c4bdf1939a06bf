"""Keep broker credentials out of metrics, logs and error messages.

Broker URLs carry passwords, and users do not always percent-encode them, so
a password may hold `@ : / % # ? ;`. Parsing such a URL with urllib splits it
in the wrong place and leaks half the password; these helpers instead treat
everything up to the last `@` of each URL as secret.
"""

from __future__ import annotations

import re
from urllib.parse import quote, unquote

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_MASK = "***"


def _split_alternates(url: str) -> list[str]:
    """Split kombu's `url1;url2` failover lists, but only where a `;` is
    followed by a new scheme: a `;` inside a password stays in its URL."""
    parts: list[str] = []
    for piece in url.split(";"):
        if parts and not _SCHEME.match(piece):
            parts[-1] += ";" + piece
        else:
            parts.append(piece)
    return parts


def _split_userinfo(url: str) -> tuple[str, str, str]:
    """(scheme with '://', userinfo, rest) of one URL; userinfo may be ''."""
    match = _SCHEME.match(url)
    scheme = match.group(0) if match else ""
    body = url[len(scheme) :]
    userinfo, at, rest = body.rpartition("@")
    if not at:
        return scheme, "", body
    return scheme, userinfo, rest


def redact_url(url: str) -> str:
    """The URL without user, password, query or fragment: a safe label.

    `redis://:p@ss@10.0.0.1:6379/0?ssl_cert_reqs=none` -> `redis://10.0.0.1:6379/0`.
    The query is dropped because it may carry secrets too (`?password=`).
    """
    out = []
    for part in _split_alternates(url):
        scheme, _, rest = _split_userinfo(part)
        out.append(scheme + re.split(r"[?#]", rest, maxsplit=1)[0])
    return ";".join(out)


def split_credentials(url: str) -> tuple[str, str | None, str | None]:
    """(URL without userinfo, user, password) of one URL, unquoted like kombu.

    Done by hand so that an unencoded `#`, `?` or `/` in a password neither
    breaks the parse nor ends up in a parser's error message.
    """
    scheme, userinfo, rest = _split_userinfo(url)
    if not userinfo:
        return url, None, None
    user, colon, password = userinfo.partition(":")
    return scheme + rest, unquote(user) or None, (unquote(password) or None) if colon else None


def secrets_of(url: str) -> set[str]:
    """Every spelling of the credentials in `url` that could show up in text."""
    found: set[str] = set()
    for part in _split_alternates(url):
        _, userinfo, _ = _split_userinfo(part)
        if not userinfo:
            continue
        user, colon, password = userinfo.partition(":")
        # "redis://token@host" puts the secret where the user name goes.
        candidates = [userinfo, password] if colon else [userinfo]
        if colon and not user:
            candidates.append(":" + password)
        for secret in candidates:
            if secret:
                found.update({secret, unquote(secret), quote(unquote(secret), safe="")})
    found.discard("")
    return found


def scrub(text: str, *urls: str, secrets: tuple[str | None, ...] = ()) -> str:
    """`text` with each URL replaced by its redacted form and every password
    spelling masked; for exception messages that may quote the URL."""
    for url in urls:
        if url:
            text = text.replace(url, redact_url(url))
    masks: set[str] = {s for s in secrets if s}
    for url in urls:
        masks |= secrets_of(url)
    for secret in sorted(masks, key=len, reverse=True):
        text = text.replace(secret, _MASK)
    return text

"""Keeping a DSN's password out of every message, without trusting the DSN to be a well-formed URL.

A URL parser is the wrong tool for redaction: ``postgresql://u:S3cret#PW@h/db`` parses (``urlsplit``) as host
``u``, port ``S3cret`` and a fragment ``PW@h/db``, so a redactor built on it finds no password and prints it, and
so does a driver that echoes the pieces it could not make sense of (asyncpg: ``invalid literal for int() with
base 10: 'S3cret'``). So the rule here is textual and errs on the side of hiding: after the scheme (with or
without its ``:`` and slashes), everything up to the **last** ``@`` of the DSN is the user information; of it only
a plain user name (before the first ``:``) is shown, the rest is replaced by ``***``. On top of that, the value of
every ``password=``/``sslpassword=`` parameter (URL query or libpq keyword style) is hidden wherever it appears.
A DSN whose query itself holds an ``@`` is over-redacted (its host is hidden too): safe, and rare.

For messages that come from elsewhere (a driver error, a ``__cause__`` chain), :func:`dsn_secrets` lists the
strings to hide (the password as written and percent-decoded) and :func:`mask_secrets` / :func:`scrub_exception`
hide them, and the pieces a URL parser may cut them into as whole words.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, unquote, urlsplit

__all__ = ["redact_dsn", "dsn_secrets", "dsn_user_and_rest", "mask_secrets", "scrub_exception", "split_userinfo",
           "dsn_identity"]

MASK = "***"
_PREFIX = re.compile(r"(?i)\s*(?:[a-z][a-z0-9+.-]*(?::/{1,2}|/{1,2})|postgres(?:ql)?:)")
_PASSWORD_PARAM = re.compile(r"(?i)(\b\w*password\s*=\s*)('(?:[^'\\]|\\.)*'|.*?)(?=&\w+=|\s\w+\s*=|$)")
_PLAIN_USER = re.compile(r"[A-Za-z0-9._~%+-]*")
_CUT = re.compile(r"[#/?@:&=\s]")
#: Pieces shorter than this are not masked in foreign text (masking every "ab" would garble the message).
MIN_PIECE = 3


def split_userinfo(dsn: str) -> tuple[str, str, str] | None:
    """``(prefix, userinfo, rest)`` with ``userinfo`` everything between the scheme and the last ``@``; ``None``
    when the DSN has no ``@``. Works on any string, parseable or not."""
    at = dsn.rfind("@")
    if at < 0:
        return None
    match = _PREFIX.match(dsn)
    start = match.end() if match and match.end() <= at else 0
    return dsn[:start], dsn[start:at], dsn[at:]


def dsn_user_and_rest(dsn: str) -> tuple[str, str]:
    """The user name (``""`` when absent or ambiguous, still percent-encoded) and what follows the user
    information: ``host:port/db?query`` (no password in either, by :func:`split_userinfo`'s rule)."""
    parts = split_userinfo(dsn)
    if parts is None:
        match = _PREFIX.match(dsn)
        return "", dsn[match.end():] if match else dsn
    user = parts[1].partition(":")[0]
    return (user if _PLAIN_USER.fullmatch(user) else ""), parts[2][1:]


def _redact_params(text: str) -> str:
    return _PASSWORD_PARAM.sub(lambda m: m.group(1) + MASK if m.group(2) else m.group(0), text)


def redact_dsn(dsn: str | None) -> str | None:
    """``dsn`` with its password (and anything that may be part of it) replaced by ``***``: safe to print."""
    if not dsn:
        return dsn
    parts = split_userinfo(dsn)
    if parts is not None:
        prefix, userinfo, rest = parts
        user, colon, _password = userinfo.partition(":")
        if not _PLAIN_USER.fullmatch(user):
            shown = MASK  # the "user" holds URL delimiters: the parse is ambiguous, hide all of it
        else:
            shown = user + (":" + MASK if colon else "")
        dsn = prefix + shown + rest
    return _redact_params(dsn)


def dsn_secrets(dsn: str | None) -> list[str]:
    """The strings that must not appear in any output about ``dsn`` (the password as written and
    percent-decoded, ``password=`` values, an ambiguous user information), longest first."""
    if not dsn:
        return []
    found: list[str] = []
    parts = split_userinfo(dsn)
    if parts is not None:
        _prefix, userinfo, _rest = parts
        user, colon, password = userinfo.partition(":")
        if colon:
            found.append(password)
        if not _PLAIN_USER.fullmatch(user):
            found.append(userinfo)
    for match in _PASSWORD_PARAM.finditer(dsn):
        found.append(match.group(2).strip("'"))
    secrets = {form for secret in found for form in (secret, unquote(secret)) if form}
    return sorted(secrets, key=len, reverse=True)


def _pieces(secrets: list[str]) -> re.Pattern[str] | None:
    """The pieces a URL parser may cut a secret into (at ``#/?@:&=``), as whole words: a driver that could not
    parse the DSN echoes them (``invalid literal for int(): 'S3cret'``)."""
    pieces = {p for secret in secrets for p in _CUT.split(secret) if len(p) >= MIN_PIECE and p != secret}
    if not pieces:
        return None
    alternatives = "|".join(re.escape(p) for p in sorted(pieces, key=len, reverse=True))
    return re.compile(rf"(?<![A-Za-z0-9])(?:{alternatives})(?![A-Za-z0-9])")


def mask_secrets(text: str, dsn: str | None, secrets: list[str] | None = None) -> str:
    """``text`` with the DSN itself redacted and every secret of it (and its pieces) replaced by ``***``."""
    if not dsn:
        return text
    if dsn in text:
        text = text.replace(dsn, redact_dsn(dsn) or "")
    secrets = dsn_secrets(dsn) if secrets is None else secrets
    for secret in secrets:
        text = text.replace(secret, MASK)
    pieces = _pieces(secrets)
    return pieces.sub(MASK, text) if pieces is not None else text


def _scrub_value(value: object, dsn: str, secrets: list[str]) -> object:
    if isinstance(value, str):
        return mask_secrets(value, dsn, secrets)
    return value


def scrub_exception(exc: BaseException | None, dsn: str | None) -> None:
    """Mask ``dsn``'s secrets in place in ``exc`` and its ``__cause__``/``__context__`` chain (args and string
    attributes such as asyncpg's ``detail`` or ``OSError.strerror``), so a traceback printed later shows none."""
    secrets = dsn_secrets(dsn)
    if not dsn or not secrets:
        return
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        try:
            exc.args = tuple(_scrub_value(a, dsn, secrets) for a in exc.args)
            for name, value in list(vars(exc).items()):
                if isinstance(value, str):
                    setattr(exc, name, _scrub_value(value, dsn, secrets))
            if isinstance(exc, OSError):
                for name in ("strerror", "filename", "filename2"):
                    value = getattr(exc, name, None)
                    if isinstance(value, str):
                        setattr(exc, name, _scrub_value(value, dsn, secrets))
        except (AttributeError, TypeError):  # an exception type with read-only attributes: nothing more to do
            pass
        exc = exc.__cause__ or exc.__context__


def dsn_identity(dsn: str) -> dict[str, str]:
    """``{"backend": "postgres", "host", "port", "database"[, "search_path"]}`` of a DSN (which store it names, for
    backup manifests); a part that cannot be parsed is ``"?"``.

    Only these fields are read, so nothing else of the DSN (password, user, other options) can leak into a
    manifest, even from a malformed URL.
    """
    host = port = database = "?"
    search_path = ""
    try:
        parts = urlsplit(dsn)
        if parts.scheme.lower() in ("postgres", "postgresql") and parts.netloc:
            host = parts.hostname or ""
            port = str(parts.port or 5432)
            database = unquote(parts.path.lstrip("/")) or unquote(parts.username or "")
            for name, value in parse_qsl(parts.query):
                if name == "host":
                    host = value
                elif name == "port":
                    port = value
                elif name in ("dbname", "database"):
                    database = value
                elif name == "search_path":
                    search_path = value
    except ValueError:
        host = port = database = "?"
    out = {"backend": "postgres", "host": host.lower(), "port": port, "database": database}
    if search_path:
        out["search_path"] = search_path
    return out

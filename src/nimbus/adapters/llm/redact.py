"""Redaction of the operator's secrets from model errors, which tenants read.

A model error's message becomes a run's stored ``error``, its SSE ``error`` event, the
thread's ``__error__``, the OpenAI facade's 502 and log lines: every tenant of the server
can read it. What it is built from may hold the operator's secrets:

* the endpoint's base URL: credentials (``https://user:pass@host``) and query parameters
  (``?api-key=...``, Azure style) — :func:`redact_url` drops the first and replaces the
  values of the second with ``***``;
* the upstream's error body, which may echo the request and so its ``Authorization``
  header — :class:`Redactor` removes the configured secrets (the API key, the URL's
  credentials and query values: verbatim, URL-encoded, JSON-escaped, and any 8 characters
  or more of one in a row, as in ``sk-abc…wxyz`` hints) and key-shaped strings whatever
  their value (``Bearer <token>``, ``sk-...``, ``api-key: ...``, ``"api_key": "..."``).

Redaction only runs when an error is built, never on a successful call's path.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Iterable
from urllib.parse import quote, quote_plus, unquote, unquote_plus, urlsplit, urlunsplit

REDACTED = "***"

#: Secrets shorter than this are not looked for in text: they would match everywhere.
MIN_SECRET = 4
#: A run of this many characters of a secret, anywhere in the text, is removed.
FRAGMENT = 8

# What keys and tokens are written with (letters, digits, base64 and URL-safe punctuation).
_TOKEN_CHARS = string.ascii_letters + string.digits + "_-.~+/=*%"
# "Bearer <token>" (and OpenAI's masked "sk-abc***wxyz" hints, `*` included).
_BEARER = re.compile(r"(?i)\b(bearer\s+)[\w\-.~+/=*]+")
# Provider key prefixes: OpenAI/Anthropic/DeepSeek (sk-, sk_), Groq (gsk_), xAI (xai-),
# Hugging Face (hf_), Google (AIza).
_KEY_SHAPED = re.compile(r"(?<![\w-])(?:sk[-_]|gsk_|xai-|hf_|AIza)[\w\-*]{8,}")
# "name: value", "name=value" and '"name": "value"' for names that carry credentials.
_NAMED = re.compile(
    r"""(?ix)
    (?<![a-z0-9])
    (?P<name>(?:x-)?(?:api[-_\s]?key|(?:proxy-)?authorization|access[-_]?token|auth[-_]?token
        |refresh[-_]?token|client[-_]?secret|secret[-_]?key|password|passwd|secret|token))
    (?P<sep>\\?["']?\s*[:=]\s*\\?["']?)
    (?P<value>(?:(?:bearer|basic|token)\s+)?[^\s"'\\&,;}\]]+)
    """
)


def redact_url(url: str) -> str:
    """``url`` fit to show: no ``user:pass@``, each query value ``***``, no fragment."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    query = "&".join(
        f"{field.partition('=')[0]}={REDACTED}" for field in parts.query.split("&") if field
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def url_secrets(url: str) -> list[str]:
    """The secrets ``url`` holds: its user name, password and query values, as written and
    decoded."""
    parts = urlsplit(url)
    found = [parts.username or "", parts.password or ""]
    found += [field.partition("=")[2] for field in parts.query.split("&")]
    return [form for raw in found for form in (raw, unquote(raw), unquote_plus(raw)) if form]


class Redactor:
    """Removes given secrets, and strings shaped like keys, from text shown to tenants."""

    def __init__(self, secrets: Iterable[str | None]) -> None:
        forms: set[str] = set()
        for secret in secrets:
            if secret and len(secret) >= MIN_SECRET:
                escaped = json.dumps(secret)[1:-1]
                forms.update({secret, quote(secret, safe=""), quote_plus(secret), escaped})
        # A secret shorter than FRAGMENT is removed whole; a longer one by its FRAGMENT-long
        # runs, which also removes any part of it long enough to help a guess.
        self._short = sorted((f for f in forms if len(f) < FRAGMENT), key=len, reverse=True)
        self._fragments = frozenset(
            f[i : i + FRAGMENT] for f in forms for i in range(len(f) - FRAGMENT + 1)
        )

    def __call__(self, text: str) -> str:
        """``text`` without the secrets and key-shaped strings."""
        # The patterns first: a key they remove whole leaves no part for the secrets' pass.
        text = _NAMED.sub(_named_value, text)
        text = _BEARER.sub(rf"\g<1>{REDACTED}", text)
        text = _KEY_SHAPED.sub(REDACTED, text)
        text = self._without_fragments(text)
        for secret in self._short:
            text = text.replace(secret, REDACTED)
        return text

    def _without_fragments(self, text: str) -> str:
        if not self._fragments:
            return text
        spans: list[list[int]] = []
        for i in range(len(text) - FRAGMENT + 1):
            if text[i : i + FRAGMENT] in self._fragments:
                if spans and spans[-1][1] >= i:
                    spans[-1][1] = i + FRAGMENT
                else:
                    spans.append([i, i + FRAGMENT])
        if not spans:
            return text
        out, end = [], 0
        for start, stop in spans:
            out += [text[end:start], REDACTED]
            end = stop
        out.append(text[end:])
        return "".join(out)


def _named_value(match: re.Match[str]) -> str:
    return f"{match['name']}{match['sep']}{REDACTED}"


def excerpt(text: str, limit: int) -> str:
    """At most ``limit`` characters of ``text`` (and " …" if cut), cut before a word rather
    than inside one: a key cut short could escape the patterns above, and would be shown
    in part."""
    if len(text) <= limit:
        return text
    cut = text[:limit].rstrip(_TOKEN_CHARS).rstrip()
    return f"{cut} …" if cut else "…"

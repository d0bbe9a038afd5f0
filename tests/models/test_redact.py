"""Redaction of the operator's secrets from model errors (nimbus.adapters.llm.redact)."""

from __future__ import annotations

from urllib.parse import quote

import pytest

from nimbus.adapters.llm.redact import FRAGMENT, Redactor, excerpt, redact_url, url_secrets

KEY = "sk-operator-secret-0123456789abcdef"
URL = "https://nimbus-user:pw-secret-123@models.example:8443/v1?api-key=qsecret-456&v=2024-02-01"
SECRETS = [KEY, "nimbus-user", "pw-secret-123", "qsecret-456", "2024-02-01"]


def leaks(text: str) -> list[str]:
    """The secrets ``text`` shows, whole or (the key) by any FRAGMENT characters of it."""
    found = [s for s in SECRETS if s in text]
    found += [KEY[i : i + FRAGMENT] for i in range(len(KEY) - FRAGMENT + 1)]
    return [s for s in found if s in text]


@pytest.fixture
def redact() -> Redactor:
    return Redactor([KEY, *url_secrets(URL)])


def test_redact_url_drops_credentials_and_query_values() -> None:
    assert redact_url(URL) == "https://models.example:8443/v1?api-key=***&v=***"
    assert redact_url("http://127.0.0.1:9/v1") == "http://127.0.0.1:9/v1"
    assert redact_url("http://tok@[::1]:9/v1?k#frag") == "http://[::1]:9/v1?k=***"
    assert redact_url("localhost:8000") == "localhost:8000"  # not a URL: nothing to drop


def test_url_secrets_as_written_and_decoded() -> None:
    found = url_secrets("http://u%40x:p%2Bw@h/v1?api-key=a%2Bb+c&flag")
    assert {"u%40x", "u@x", "p%2Bw", "p+w", "a%2Bb+c", "a+b+c", "a+b c"} <= set(found)
    assert url_secrets("http://h/v1") == []


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        (f"Incorrect API key provided: {KEY}.", "Incorrect API key provided: "),
        (f"bad key {quote(KEY + '/+', safe='')}", "bad key "),
        (f'{{"headers": {{"Authorization": "Bearer {KEY}"}}}}', '"Authorization": "***"'),
        ("request: POST /v1/chat/completions?api-key=qsecret-456 HTTP/1.1", "api-key=***"),
        ("forwarded for nimbus-user with pw-secret-123", "forwarded for *** with ***"),
        (f"your key {KEY[:14]}…{KEY[-6:]} is invalid", "is invalid"),  # hints, in part
        ("api-version 2024-02-01 is not supported", "api-version *** is not supported"),
    ],
)
def test_configured_secrets_are_removed(redact: Redactor, text: str, kept: str) -> None:
    out = redact(text)
    assert leaks(out) == []
    assert kept in out


@pytest.mark.parametrize(
    ("text", "out"),
    [
        ("Authorization: Bearer abc.def-ghi", "Authorization: ***"),
        ("sent bearer eyJhbGciOiJIUzI1NiJ9.e30.x", "sent bearer ***"),
        ('{"api_key": "other-key-1"}', '{"api_key": "***"}'),
        ("api-key: 0f3c9a; x-api-key=77aa&x=1", "api-key: ***; x-api-key=***&x=1"),
        ('{\\"authorization\\": \\"Basic dXNlcjpwYXNz\\"}', '{\\"authorization\\": \\"***\\"}'),
        ("key sk-proj-Zx81kQ_Qa-l0", "key ***"),
        (
            "Incorrect API key provided: sk-abc12***********wxyz.",
            "Incorrect API key provided: ***.",
        ),
        ("gsk_abcdefgh1234 and AIzaSyA1234567890", "*** and ***"),
        ("password=hunter2, token: t0k3n", "password=***, token: ***"),
    ],
)
def test_key_shaped_strings_are_removed(redact: Redactor, text: str, out: str) -> None:
    # secrets the server does not know of: an upstream may echo any header it was sent
    assert redact(text) == out


@pytest.mark.parametrize(
    "text",
    [
        "The model `gpt-5` does not exist or you do not have access to it.",
        "This model's maximum context length is 4096 tokens; max_tokens: 5000 is too many.",
        "Rate limit reached for requests: task-queue, disk_usage, risk-of-overload",
        "Invalid value for 'messages[0].role': must be one of system, user, assistant",
    ],
)
def test_useful_messages_are_kept(redact: Redactor, text: str) -> None:
    assert redact(text) == text


def test_short_secrets_are_not_looked_for() -> None:
    # a one-letter key would erase every such letter, and hides nothing worth hiding
    assert Redactor(["x", "", None, "abc"])("xyz abc") == "xyz abc"
    assert Redactor(["abcd"])("xyz abcd") == "xyz ***"


def test_excerpt_cuts_before_a_word() -> None:
    assert excerpt("short", 300) == "short"
    assert excerpt("model not found sk-abcdefghijklmnop", 24) == "model not found …"
    assert excerpt("x" * 500, 300) == "…"

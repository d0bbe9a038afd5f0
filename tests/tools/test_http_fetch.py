"""Tests for nimbus.adapters.tools.http_fetch: address rules, URL rules, real loopback fetches."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from hypothesis import example, given, settings
from hypothesis import strategies as st

from nimbus.adapters.tools.http_fetch import (
    FetchError,
    FetchPolicy,
    FetchRefused,
    SafeResolver,
    check_address,
    check_url,
    fetch_url,
)
from nimbus.exceptions import ToolError

LOCAL = FetchPolicy(allow_private=True)

# --------------------------------------------------------------------------- addresses

BAD_ADDRESSES = [
    "127.0.0.1",
    "127.255.255.254",
    "10.0.0.5",
    "172.16.0.1",
    "172.31.255.255",
    "192.168.1.1",
    "169.254.169.254",
    "169.254.0.1",
    "0.0.0.0",
    "0.1.2.3",
    "100.64.0.1",
    "100.127.255.255",
    "224.0.0.1",
    "239.255.255.250",
    "255.255.255.255",
    "240.0.0.1",
    "192.0.2.1",
    "198.18.0.1",
    "::1",
    "::",
    "fe80::1",
    "fe80::1%eth0",
    "fc00::1",
    "fd12:3456::1",
    "fec0::1",
    "ff02::1",
    "::ffff:127.0.0.1",
    "::ffff:10.0.0.1",
    "::ffff:169.254.169.254",
    "::ffff:7f00:1",
    "::127.0.0.1",
    "64:ff9b::a9fe:a9fe",
    "2002:7f00:1::1",
    "2002:a9fe:a9fe::",
    "2001:db8::1",
    "2001::1",
    "not-an-ip",
    "",
]

GOOD_ADDRESSES = [
    "8.8.8.8",
    "1.1.1.1",
    "93.184.216.34",
    "172.32.0.1",
    "100.128.0.1",
    "2606:4700:4700::1111",
    "2001:4860:4860::8888",
    "::ffff:8.8.8.8",
    "64:ff9b::808:808",
    "2002:808:808::1",
]


@pytest.mark.parametrize("ip", BAD_ADDRESSES)
def test_check_address_refuses(ip: str) -> None:
    with pytest.raises(FetchRefused, match=r"^refused: "):
        check_address(ip)


@pytest.mark.parametrize("ip", GOOD_ADDRESSES)
def test_check_address_accepts(ip: str) -> None:
    check_address(ip)


@pytest.mark.parametrize(
    ("ip", "reason"),
    [
        ("10.0.0.5", "refused: 10.0.0.5 is a private address"),
        ("127.0.0.1", "loopback"),
        ("169.254.169.254", "link-local"),
        ("100.64.0.1", "carrier-grade NAT"),
        ("224.0.0.1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("fec0::1", "site-local"),
        ("::ffff:127.0.0.1", "loopback address (embedded IPv4 127.0.0.1)"),
    ],
)
def test_check_address_names_the_rule(ip: str, reason: str) -> None:
    with pytest.raises(FetchRefused, match=r"^refused: ") as info:
        check_address(ip)
    assert reason in str(info.value)


@pytest.mark.parametrize(
    "ip", ["127.0.0.1", "10.0.0.5", "172.16.3.4", "192.168.1.1", "::1", "fd00::1", "::ffff:7f00:1"]
)
def test_allow_private_admits_loopback_and_private(ip: str) -> None:
    check_address(ip, allow_private=True)


@pytest.mark.parametrize(
    "ip",
    ["169.254.169.254", "fe80::1", "0.0.0.0", "100.64.0.1", "224.0.0.1", "::ffff:169.254.169.254"],
)
def test_allow_private_never_admits_link_local_and_special(ip: str) -> None:
    with pytest.raises(FetchRefused):
        check_address(ip, allow_private=True)


def test_errors_are_tool_errors() -> None:
    assert issubclass(FetchRefused, FetchError)
    assert issubclass(FetchError, ToolError)


# --------------------------------------------------------------------------------- URLs


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://example.com/file", "scheme 'ftp'"),
        ("file:///etc/passwd", "scheme 'file'"),
        ("javascript:alert(1)", "scheme 'javascript'"),
        ("gopher://example.com/", "scheme 'gopher'"),
        ("//example.com/x", "use http:// or https://"),
        ("example.com", "use http:// or https://"),
        ("http://user:pw@example.com/", "credentials"),
        ("http://user@example.com/", "credentials"),
        ("http://:secret@example.com/", "credentials"),
        ("http:///path", "no host"),
        ("http://", "no host"),
        ("http://example.com:99999/", "not a valid URL"),
        ("http://evil.com\\@127.0.0.1/", "not a valid URL"),
        ("http://[::1]:18080@/", "not a valid URL"),  # raised IndexError once
        ("http://[", "not a valid URL"),
        ("http://[::1", "not a valid URL"),
        ("http://[::1]]/", "not a valid URL"),
        ("http://[::1]x/", "not a valid URL"),
        ("http://[not:an:ip]/", "not a valid URL"),
        ("http://a@[::1]@b/", "not a valid URL"),
        ("http://:80/", "not a valid URL"),
        ("http://%zz/", "not a valid URL"),
        ("http://a%00b/", "not a valid URL"),
        ("http://a b/", "not a valid URL"),
        ("http://\x00/", "not a valid URL"),
        ("http://a..b/", "not a valid URL"),
        ("http://z[]z]xn--@", "not a valid URL"),
        ("http://" + "a" * 64 + ".com/", "not a valid URL"),  # getaddrinfo: UnicodeError
        ("http://" + "a." * 127 + "a/", "not a valid URL"),  # 255 characters
        ("http://metadata.google.internal/computeMetadata/v1/", "cloud metadata host"),
        ("http://METADATA.GOOGLE.INTERNAL./", "cloud metadata host"),
        ("http://metadata/", "cloud metadata host"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://127.0.0.1/", "loopback"),
        ("http://[::1]:8080/", "loopback"),
        ("http://[::ffff:127.0.0.1]/", "loopback"),
        ("http://[fe80::1%25eth0]/", "link-local"),
        ("http://2130706433/", "2130706433 (= 127.0.0.1) is a loopback"),
        ("http://0x7f.1/", "(= 127.0.0.1) is a loopback"),
        ("http://0177.0.0.1/", "(= 127.0.0.1) is a loopback"),
        ("http://127.1/", "(= 127.0.0.1) is a loopback"),
        ("http://0/", "(= 0.0.0.0) is an unspecified"),
        ("http://10.1/", "(= 10.0.0.1) is a private"),
        ("http://0xa9fea9fe/", "(= 169.254.169.254) is a link-local"),
    ],
)
def test_check_url_refuses(url: str, reason: str) -> None:
    with pytest.raises(FetchRefused) as info:
        check_url(url)
    assert reason in str(info.value)


async def test_fetch_of_a_malformed_url_is_refused() -> None:
    with pytest.raises(FetchRefused, match="not a valid URL"):
        await fetch_url("http://[::1]:18080@/", policy=LOCAL)


# Pieces of URLs that parsers trip on, so that generated strings reach the host parser.
_URL_PIECES = st.sampled_from(
    [*"[]:@/%?#.\\ az09-_\x00", "::1", "http://", "https://", "%zz", "%25", "xn--", "0x"]
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), st.lists(_URL_PIECES, max_size=12).map("".join)))
@example("[::1]:18080@/")  # found by an attacker: IndexError from yarl
@example("z[]z]xn--@")  # found by this test (with more examples)
def test_check_url_raises_nothing_but_fetch_refused(text: str) -> None:
    for url in (text, "http://" + text):
        with contextlib.suppress(FetchRefused):
            check_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com/path?q=1",
        "HTTP://Example.COM",
        "http://8.8.8.8:8080/",
        "http://[2606:4700:4700::1111]/",
        "https://bücher.de/",
        "http://under_score.example./",
        "http://[2001:4860:4860::8888%25eth0]/",
        "http://" + "a" * 63 + "." + "b" * 63 + ".example/",
    ],
)
def test_check_url_accepts(url: str) -> None:
    assert check_url(url).raw_host


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("example.com", True),
        ("EXAMPLE.com.", True),
        ("api.example.com", True),
        ("a.b.example.com", True),
        ("docs.python.org", True),
        ("badexample.com", False),
        ("example.com.evil.net", False),
        ("python.org", False),
        ("evil.net", False),
    ],
)
def test_allowed_hosts(host: str, allowed: bool) -> None:
    policy = FetchPolicy(allowed_hosts=frozenset({"Example.com", "docs.python.org."}))
    if allowed:
        check_url(f"https://{host}/", policy)
    else:
        with pytest.raises(FetchRefused, match="not in the allowed hosts list"):
            check_url(f"https://{host}/", policy)


def test_policy_validation() -> None:
    with pytest.raises(ValueError):
        FetchPolicy(timeout_s=0)
    with pytest.raises(ValueError):
        FetchPolicy(max_bytes=-1)


# ------------------------------------------------------------------------ name resolution


def fake_dns(
    table: dict[str, list[str] | Callable[[], list[str]]],
) -> Callable[..., Any]:
    """An async getaddrinfo answering from ``table`` (a list, or a callable per call)."""
    calls: list[str] = []

    async def getaddrinfo(host: str, port: int, **_: Any) -> list[tuple[Any, ...]]:
        calls.append(host)
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        entry = table[host]
        ips = entry() if callable(entry) else entry
        out: list[tuple[Any, ...]] = []
        for ip in ips:
            if ":" in ip:
                out.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (ip, port, 0, 0)))
            else:
                out.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)))
        return out

    getaddrinfo.calls = calls  # type: ignore[attr-defined]
    return getaddrinfo


@pytest.mark.parametrize(
    ("ips", "bad"),
    [
        (["10.0.0.7"], "10.0.0.7"),
        (["93.184.216.34", "10.0.0.7"], "10.0.0.7"),
        (["10.0.0.7", "93.184.216.34"], "10.0.0.7"),
        (["2606:4700::1", "::1"], "::1"),
        (["93.184.216.34", "169.254.169.254"], "169.254.169.254"),
        (["::ffff:192.168.0.1"], "::ffff:192.168.0.1"),
    ],
)
async def test_safe_resolver_refuses_any_bad_address(ips: list[str], bad: str) -> None:
    resolver = SafeResolver(getaddrinfo=fake_dns({"evil.test": ips}))
    with pytest.raises(FetchRefused, match=f"'evil.test' resolves to {bad}"):
        await resolver.resolve("evil.test", 80, socket.AF_UNSPEC)


async def test_safe_resolver_returns_validated_addresses() -> None:
    resolver = SafeResolver(getaddrinfo=fake_dns({"good.test": ["93.184.216.34", "2606::1"]}))
    results = await resolver.resolve("good.test", 443, socket.AF_UNSPEC)
    assert [(r["host"], r["port"], r["hostname"]) for r in results] == [
        ("93.184.216.34", 443, "good.test"),
        ("2606::1", 443, "good.test"),
    ]
    await resolver.close()


async def test_unresolvable_host() -> None:
    with pytest.raises(FetchError, match=r"could not resolve host 'nowhere.test'") as info:
        await fetch_url("http://nowhere.test/", _getaddrinfo=fake_dns({}))
    assert not isinstance(info.value, FetchRefused)


@pytest.mark.parametrize("ips", [["10.0.0.5"], ["93.184.216.34", "192.168.0.10"], ["::1"]])
async def test_fetch_refuses_name_resolving_to_private(ips: list[str]) -> None:
    with pytest.raises(FetchRefused, match="resolves to"):
        await fetch_url("http://intranet.test/", _getaddrinfo=fake_dns({"intranet.test": ips}))


# ------------------------------------------------------------------------ loopback server


@dataclass
class Server:
    base: str
    port: int
    requests: list[str] = field(default_factory=list)


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    never = asyncio.Event()
    srv = Server(base="", port=0)

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        srv.requests.append(request.path_qs)
        return await handler(request)

    async def text(request: web.Request) -> web.Response:
        return web.Response(text=f"hello {request.headers.get('User-Agent')}")

    async def big(_: web.Request) -> web.Response:
        return web.Response(body=b"a" * 10_000, content_type="text/plain")

    async def charset(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        body = "café".encode("latin-1" if name == "latin-1" else "utf-8")
        return web.Response(body=body, headers={"Content-Type": f"text/plain; charset={name}"})

    async def slow(_: web.Request) -> web.Response:
        await never.wait()
        return web.Response(text="late")

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(request.query["to"])

    async def raw_redirect(request: web.Request) -> web.Response:
        # HTTPFound parses its location; this sends one that does not parse
        return web.Response(status=302, headers={"Location": request.query["to"]})

    async def chain(request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        if n == 0:
            return web.Response(text="done")
        raise web.HTTPFound(f"/chain/{n - 1}")

    app = web.Application(middlewares=[record])
    app.router.add_get("/text", text)
    app.router.add_get("/big", big)
    app.router.add_get("/charset/{name}", charset)
    app.router.add_get("/slow", slow)
    app.router.add_get("/redirect", redirect)
    app.router.add_get("/raw-redirect", raw_redirect)
    app.router.add_get("/chain/{n}", chain)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    sockets = runner.addresses
    srv.port = sockets[0][1]
    srv.base = f"http://127.0.0.1:{srv.port}"
    try:
        yield srv
    finally:
        never.set()
        await runner.cleanup()


async def test_fetch_loopback_content(server: Server) -> None:
    result = await fetch_url(f"{server.base}/text", policy=LOCAL)
    assert result.status == 200
    assert result.text == "hello nimbus-http-fetch/0.1"
    assert result.content_type == "text/plain"
    assert result.truncated is False
    assert result.bytes_read == len(result.text)
    assert result.url == f"{server.base}/text"


@pytest.mark.parametrize("charset", ["latin-1", "utf-8", "no-such-charset", "base64", "rot13"])
async def test_fetch_decodes_declared_charset(server: Server, charset: str) -> None:
    result = await fetch_url(f"{server.base}/charset/{charset}", policy=LOCAL)
    assert result.text == "café"


@pytest.mark.parametrize(("max_bytes", "truncated"), [(1000, True), (0, True), (10_000, False)])
async def test_fetch_truncates_at_max_bytes(
    server: Server, max_bytes: int, truncated: bool
) -> None:
    policy = FetchPolicy(allow_private=True, max_bytes=max_bytes)
    result = await fetch_url(f"{server.base}/big", policy=policy)
    assert result.truncated is truncated
    assert result.bytes_read == len(result.text) == min(max_bytes, 10_000)


async def test_fetch_times_out(server: Server) -> None:
    policy = FetchPolicy(allow_private=True, timeout_s=0.2)
    with pytest.raises(FetchError, match=r"timed out after 0\.2s"):
        await fetch_url(f"{server.base}/slow", policy=policy)
    assert server.requests == ["/slow"]


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:{port}/text",
        "http://localhost:{port}/text",
        "http://[::ffff:127.0.0.1]:{port}/text",
        "http://2130706433:{port}/text",
        "http://0x7f.1:{port}/text",
    ],
)
async def test_loopback_refused_by_default_without_connecting(server: Server, url: str) -> None:
    with pytest.raises(FetchRefused):
        await fetch_url(url.format(port=server.port))
    async with aiohttp.ClientSession() as session:
        with pytest.raises(FetchRefused):
            await fetch_url(url.format(port=server.port), session=session)
    assert server.requests == []


async def test_name_is_pinned_to_validated_address(server: Server) -> None:
    dns = fake_dns({"app.test": ["127.0.0.1"]})
    result = await fetch_url(f"http://app.test:{server.port}/text", policy=LOCAL, _getaddrinfo=dns)
    assert result.status == 200
    assert result.url == f"http://app.test:{server.port}/text"
    assert dns.calls == ["app.test"]  # type: ignore[attr-defined]


async def test_dns_rebinding_is_refused(server: Server) -> None:
    answers = iter([["127.0.0.1"], ["169.254.169.254"]])
    dns = fake_dns({"rebind.test": lambda: next(answers)})
    connector = aiohttp.TCPConnector(
        resolver=SafeResolver(allow_private=True, getaddrinfo=dns), use_dns_cache=False
    )
    async with aiohttp.ClientSession(connector=connector) as session:
        with pytest.raises(FetchRefused, match=r"'rebind.test' resolves to 169.254.169.254"):
            await fetch_url(
                f"http://rebind.test:{server.port}/text",
                policy=LOCAL,
                session=session,
                _getaddrinfo=dns,
            )
    # validated once by the pre-check, then answered differently to the connector
    assert dns.calls == ["rebind.test", "rebind.test"]  # type: ignore[attr-defined]
    assert server.requests == []


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://metadata.google.internal/", "cloud metadata host"),
        ("http://[::ffff:169.254.169.254]/", "link-local"),
        ("file:///etc/passwd", "scheme 'file'"),
        ("http://user:pw@example.com/", "credentials"),
    ],
)
async def test_redirect_to_forbidden_target_refused_even_with_allow_private(
    server: Server, target: str, reason: str
) -> None:
    with pytest.raises(FetchRefused, match=r"redirect from 127.0.0.1") as info:
        await fetch_url(f"{server.base}/redirect?to={target}", policy=LOCAL)
    assert reason in str(info.value)


@pytest.mark.parametrize("target", ["http://[::1]:18080@/", "http://[", "http://%zz/"])
async def test_redirect_to_a_malformed_url_is_refused(server: Server, target: str) -> None:
    with pytest.raises(FetchRefused, match="not a valid URL"):
        await fetch_url(f"{server.base}/raw-redirect?to={target}", policy=LOCAL)
    assert len(server.requests) == 1


class _LoopbackResolver(AbstractResolver):
    """Stands in for public DNS: every name connects to the local test server."""

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(
                hostname=host, host="127.0.0.1", port=port, family=socket.AF_INET, proto=0, flags=0
            )
        ]

    async def close(self) -> None:
        pass


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("http://127.0.0.1:{port}/text", "loopback"),
        ("http://10.0.0.9/", "private"),
        ("http://internal.test:{port}/text", "'internal.test' resolves to 10.1.2.3"),
    ],
)
async def test_redirect_revalidated_under_default_policy(
    server: Server, target: str, reason: str
) -> None:
    dns = fake_dns({"public.test": ["93.184.216.34"], "internal.test": ["10.1.2.3"]})
    connector = aiohttp.TCPConnector(resolver=_LoopbackResolver(), use_dns_cache=False)
    url = f"http://public.test:{server.port}/redirect?to={target.format(port=server.port)}"
    async with aiohttp.ClientSession(connector=connector) as session:
        with pytest.raises(FetchRefused) as info:
            await fetch_url(url, session=session, _getaddrinfo=dns)
    assert reason in str(info.value)
    assert len(server.requests) == 1 and server.requests[0].startswith("/redirect")


async def test_redirect_to_host_outside_allow_list(server: Server) -> None:
    dns = fake_dns({"app.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]})
    policy = FetchPolicy(allow_private=True, allowed_hosts=frozenset({"app.test"}))
    url = f"http://app.test:{server.port}/redirect?to=http://other.test:{server.port}/text"
    with pytest.raises(FetchRefused, match=r"'other.test' is not in the allowed hosts"):
        await fetch_url(url, policy=policy, _getaddrinfo=dns)
    assert len(server.requests) == 1


async def test_allow_list_refuses_before_connecting(server: Server) -> None:
    policy = FetchPolicy(allow_private=True, allowed_hosts=frozenset({"example.com"}))
    with pytest.raises(FetchRefused, match="not in the allowed hosts list"):
        await fetch_url(f"{server.base}/text", policy=policy)
    assert server.requests == []


async def test_relative_redirects_are_followed(server: Server) -> None:
    result = await fetch_url(f"{server.base}/chain/3", policy=LOCAL)
    assert result.text == "done"
    assert result.url == f"{server.base}/chain/0"
    assert server.requests == ["/chain/3", "/chain/2", "/chain/1", "/chain/0"]


async def test_too_many_redirects(server: Server) -> None:
    policy = FetchPolicy(allow_private=True, max_redirects=2)
    with pytest.raises(FetchError, match=r"too many redirects \(more than 2\)"):
        await fetch_url(f"{server.base}/chain/5", policy=policy)
    assert len(server.requests) == 3


async def test_connection_refused_is_a_fetch_error() -> None:
    with socket.socket() as sock:  # find a free port, then leave it closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(FetchError, match=r"could not connect to 127.0.0.1"):
        await fetch_url(f"http://127.0.0.1:{port}/", policy=LOCAL)

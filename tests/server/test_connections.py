"""Connection bounds of `voidprompt serve` (voidprompt.server.serving), with real sockets on
127.0.0.1: idle and trickling clients are disconnected, open connections are capped, and ids out
of SQLite's range are a 4xx."""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from voidprompt.lab.catalog import Catalog
from voidprompt.server.limits import Limits

HEADER_TIMEOUT = 0.5
MAX_CONNECTIONS = 4
HEAD = b"GET /sdapi/v1/memory HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory, server_tools: Any) -> Iterator[Any]:
    make_config, start_server = server_tools
    root = tmp_path_factory.mktemp("guarded")
    (root / "studies").mkdir()
    Catalog.open(root / "studies" / "ids.sqlite").close()  # a study with no images
    limits = Limits(header_timeout=HEADER_TIMEOUT, max_connections=MAX_CONNECTIONS, min_body_rate=1000)
    yield from start_server(make_config(root, None, limits=limits, ui=False))


def connect(server: Any) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=5)


def closed_within(sock: socket.socket, seconds: float) -> bytes | None:
    """What the server sent before closing ``sock``, if it closed it within ``seconds``; else None."""
    received = b""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if select.select([sock], [], [], left)[0]:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return received
            if not chunk:
                return received
            received += chunk
    return None


def test_an_idle_connection_is_closed_after_the_header_timeout(guarded: Any) -> None:
    with connect(guarded) as sock:
        started = time.monotonic()
        assert closed_within(sock, 3 * HEADER_TIMEOUT) == b""
        assert time.monotonic() - started >= HEADER_TIMEOUT * 0.9


def test_a_head_sent_a_byte_at_a_time_is_cut_off_at_the_header_timeout(guarded: Any) -> None:
    with connect(guarded) as sock:
        started = time.monotonic()
        sent = 0
        # One byte every 50 ms: the whole head would take 2.5 s; every byte resets no clock.
        while sent < len(HEAD):
            try:
                sock.sendall(HEAD[sent : sent + 1])
            except OSError:
                break
            sent += 1
            if closed_within(sock, 0.05) is not None:
                break
        assert sent < len(HEAD)
        assert time.monotonic() - started < 3 * HEADER_TIMEOUT


def test_after_a_response_the_next_head_has_the_same_deadline(guarded: Any) -> None:
    with connect(guarded) as sock:
        sock.sendall(HEAD)
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /sdapi")  # then nothing more: uvicorn's keep-alive timer stopped at this byte
        assert closed_within(sock, 3 * HEADER_TIMEOUT) is not None


def test_a_trickled_body_is_cut_off(guarded: Any) -> None:
    head = (
        b"POST /voidprompt/v1/tokens HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        b"content-length: 100000\r\n\r\n"
    )
    with connect(guarded) as sock:
        sock.sendall(head)
        started = time.monotonic()
        sent = 0
        while closed_within(sock, 0.05) is None:
            sock.sendall(b" ")  # 20 bytes a second against a minimum of 1000 after the grace
            sent += 1
            assert time.monotonic() - started < 4 * HEADER_TIMEOUT
        assert sent < 100000


def test_connections_beyond_the_cap_are_answered_503_and_closed(guarded: Any) -> None:
    idle = [connect(guarded) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.1)  # accepted by the server
        with connect(guarded) as extra:
            answer = closed_within(extra, 2.0)
        assert answer is not None and answer.startswith(b"HTTP/1.1 503")
        assert b"too many open connections" in answer
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + 2
    while True:  # the freed places serve again
        response = httpx.get(f"{guarded.url}/sdapi/v1/memory", timeout=5)
        if response.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert response.status_code == 200


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/voidprompt/v1/studies/ids/images/{}"),
        ("GET", "/voidprompt/v1/studies/ids/images/{}/file"),
        ("PUT", "/voidprompt/v1/studies/ids/labels/{}"),
    ],
)
def test_image_ids_beyond_sqlites_integers_are_a_422_not_a_500(guarded: Any, method: str, path: str) -> None:
    body = {"label_class": None}
    with httpx.Client(base_url=guarded.url, timeout=5) as http:
        for image_id, status in ((10**30, 422), (2**63, 422), (-1, 422), (2**63 - 1, 404), (5, 404)):
            answer = http.request(method, path.format(image_id), json=body if method == "PUT" else None)
            assert answer.status_code == status, (image_id, answer.text)


def test_run_parameters_out_of_range_are_a_422(guarded: Any) -> None:
    with httpx.Client(base_url=guarded.url, timeout=5) as http:
        for params in ({"max_jobs": 10**30}, {"max_jobs": -1}, {"batch_size": 0}, {"batch_size": 10**30}):
            assert http.post("/voidprompt/v1/studies/ids/run", params=params).status_code == 422, params


def test_serve_flags_set_the_connection_limits_and_refuse_non_positive_values() -> None:
    from voidprompt.errors import VoidpromptError
    from voidprompt.server.cli import _parser, build_config

    config = build_config(
        _parser().parse_args(["--no-miniature", "--max-connections", "32", "--header-timeout", "2.5"])
    )
    limits = config.limits  # type: ignore[attr-defined]
    assert (limits.max_connections, limits.header_timeout) == (32, 2.5)
    for argv in (["--max-connections", "0"], ["--header-timeout", "-1"], ["--header-timeout", "nan"]):
        with pytest.raises(VoidpromptError, match=f"^{argv[0]} .*: give a positive number$"):
            build_config(_parser().parse_args(["--no-miniature", *argv]))

"""Limits under real concurrency: a uvicorn gateway process, bursts of concurrent POSTs, a streamed body.

The in-process TestClient runs requests one at a time, so races between requests and the server's own
buffering of a chunked body only show against a real server.
"""

from __future__ import annotations

import http.client
import json
import select
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psutil

from app.api.keys import digest
from app.contract.jobs import JobStore
from tests.servicekit import gateway_process, metric_value

MiB = 1 << 20
Answer = tuple[int, dict[str, Any]]  # status, decoded body


def post(url: str, body: dict[str, Any], key: str) -> Answer:
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def burst(url: str, key: str, count: int, during: Callable[[], int]) -> tuple[list[Answer], list[int]]:
    """`count` POSTs released together from as many threads, and `during()` sampled until they all answered."""
    start = threading.Barrier(count)
    samples: list[int] = []

    def one(_: int) -> Answer:
        start.wait(timeout=60)
        return post(url, {"class_labels": [1]}, key)

    with ThreadPoolExecutor(count) as pool:
        futures = [pool.submit(one, n) for n in range(count)]
        while not all(future.done() for future in futures):
            samples.append(during())
            time.sleep(0.005)
        results = [future.result(timeout=120) for future in futures]
    samples.append(during())
    return results, samples


def test_concurrent_posts_never_pass_the_per_key_limit_or_the_queue_depth(tmp_path):
    keys = f"alice:{digest('hk_alice')},bob:{digest('hk_bob')}"
    limits = {"HARMONICA_API_KEYS": keys, "HARMONICA_MAX_ACTIVE_JOBS_PER_KEY": "20", "HARMONICA_MAX_QUEUE_DEPTH": "25"}
    with gateway_process(tmp_path, **limits) as (base, _, client, _):
        store = JobStore(client)
        # No worker runs: accepted jobs stay queued. Alice's 60 meet her limit of 20 (the queue has room) ...
        results, active = burst(f"{base}/generate", "hk_alice", 60, lambda: store.active("alice"))
        statuses = [status for status, _ in results]
        assert statuses.count(202) == 20 and statuses.count(429) == 40, statuses
        assert max(active) <= 20 and store.active("alice") == 20
        assert all("20 jobs queued or running" in body["detail"] for status, body in results if status == 429)
        # ... and Bob's 40 meet the queue's depth of 25, 20 of which are Alice's.
        results, queued = burst(f"{base}/generate", "hk_bob", 40, lambda: store.queued("generate"))
        statuses = [status for status, _ in results]
        assert statuses.count(202) == 5 and statuses.count(429) == 35, statuses
        assert max(queued) <= 25 and store.queued("generate") == 25
        assert all("holds 25 jobs" in body["detail"] for status, body in results if status == 429)
        with urllib.request.urlopen(f"{base}/metrics", timeout=30) as response:
            text = response.read().decode()
        assert metric_value(text, "harmonica_jobs_rejected_total", reason="key_busy") == 40
        assert metric_value(text, "harmonica_jobs_rejected_total", reason="queue_full") == 35
        assert metric_value(text, "harmonica_jobs_submitted_total", kind="generate") == 25


def stream_chunked(port: int, total: int) -> Answer:
    """POST `total` bytes to /generate as a chunked body over a raw socket; stop sending as soon as the server
    answers or closes, then read its answer."""
    head = b"POST /generate HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
    head += b"Transfer-Encoding: chunked\r\n\r\n"
    size = 64 * 1024
    frame = b"%x\r\n%s\r\n" % (size, b" " * size)
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(head)
        sock.setblocking(False)
        pending, left = memoryview(b""), total // size
        try:
            while pending or left:
                readable, writable, _ = select.select([sock], [sock], [], 60)
                if readable or not writable:  # answered (or stalled): stop sending
                    break
                if not pending:
                    pending, left = memoryview(frame), left - 1
                pending = pending[sock.send(pending) :]
            else:
                sock.setblocking(True)
                sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):  # the server may close once it has answered
            pass
        sock.settimeout(60)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, json.loads(response.read())


def test_a_huge_chunked_body_is_refused_without_buffering_it(tmp_path):
    with gateway_process(tmp_path) as (base, process, _, _):
        port = int(base.rsplit(":", 1)[1])
        assert stream_chunked(port, MiB)[0] == 413  # warm-up: the refusal path's imports and allocations
        gateway = psutil.Process(process.pid)
        before = gateway.memory_info().rss
        peak, streaming = [before], threading.Event()

        def sample() -> None:  # the peak while the body streams, not what is left after it
            while not streaming.wait(0.005):
                peak.append(gateway.memory_info().rss)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            status, body = stream_chunked(port, 64 * MiB)
        finally:
            streaming.set()
            sampler.join(timeout=30)
        peak.append(gateway.memory_info().rss)
        assert status == 413 and body["status"] == 413 and "65536 bytes" in body["detail"], body
        assert (max(peak) - before) / MiB <= 8, f"the gateway grew by {(max(peak) - before) / MiB:.1f} MiB"
        with urllib.request.urlopen(f"{base}/metrics", timeout=30) as response:
            assert metric_value(response.read().decode(), "harmonica_jobs_rejected_total", reason="too_large") == 2

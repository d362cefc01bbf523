"""Webhooks: a job's owner is told over HTTP when the job ends (and, if asked, as it progresses).

- **What is sent**: a POST of `{"type": "job.<status>" | "job.progress", "timestamp", "data": the job}`, signed
  as Standard Webhooks do (https://www.standardwebhooks.com): headers `webhook-id`, `webhook-timestamp` and
  `webhook-signature: v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">`, keyed by the owner's secret
  (`secret_for`, derived from HARMONICA_WEBHOOK_SECRET and the API key's name; `GET /webhooks/secret`).
- **When**: the job-state scripts schedule a delivery in the `{prefix}webhooks` sorted set (job id and event,
  scored by when it is due) as the job ends, and a progress report schedules one unless one is pending, so
  progress coalesces to the delivery loop's pace. Worker parents run `Deliverer.deliver_due` in a thread of
  their own: the pool processes never wait for a receiver. A claim is a ZREM, so one worker sends each.
- **Retries**: a receiver that fails (no 2xx within the timeout) is tried again after 1, 2, 4, ... seconds,
  at most HARMONICA_WEBHOOK_MAX_ATTEMPTS times. Redirects are not followed.
- **SSRF**: a URL's host must resolve to public addresses only: private, loopback, link-local, reserved and
  multicast ones are refused at admission and again before each attempt (the host may resolve differently
  by then), unless the host is listed in HARMONICA_WEBHOOK_ALLOW_HOSTS.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from .jobs import JobStore
from .settings import Settings

log = logging.getLogger("harmonica.webhooks")


def check_url(url: str, allow_hosts: set[str]) -> None:
    """Refuse (ValueError) a webhook URL that is not http(s), or whose host reaches a non-public address."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("a webhook is an http:// or https:// URL with a host")
    host = parts.hostname
    if host in allow_hosts:
        return
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, parts.port or 443, proto=socket.IPPROTO_TCP)}
    except (socket.gaierror, UnicodeError) as error:
        raise ValueError(f"the webhook host {host!r} does not resolve ({error})") from None
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if not ip.is_global or ip.is_multicast:
            raise ValueError(
                f"the webhook host {host!r} resolves to {ip}, a private, loopback, link-local or reserved address; "
                "an operator can allow it with HARMONICA_WEBHOOK_ALLOW_HOSTS"
            )


def secret_for(owner: str, settings: Settings) -> str:
    """The owner's signing secret, `whsec_<base64>`: derived, so gateway and workers agree without storing it."""
    key = hmac.new(settings.webhook_secret.encode(), owner.encode(), hashlib.sha256).digest()
    return "whsec_" + base64.b64encode(key).decode()


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header of a Standard Webhooks message."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    digest = hmac.new(key, f"{message_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *_: Any, **__: Any) -> None:  # a redirect could point anywhere: it is a failure
        return None


_opener = urllib.request.build_opener(_NoRedirects)


class Deliverer:
    """Sends the due webhooks of every job; what a worker parent's delivery thread calls."""

    def __init__(self, store: JobStore, settings: Settings) -> None:
        self.store, self.settings = store, settings

    def deliver_due(self) -> int:
        """Send every delivery that is due and that this process claims; returns how many it attempted."""
        attempted = 0
        for member, attempt in self.store.due_webhooks():
            attempted += 1
            job_id, event = member.split(":", 1)
            job = self.store.get(job_id)
            if job is None or not job.webhook:
                continue
            try:
                self.send(job.webhook, job.owner, event, job)
            except Exception as error:  # the receiver or the network: try again later, up to the limit
                if attempt + 1 < self.settings.webhook_max_attempts:
                    self.store.schedule_webhook(member, delay=2.0**attempt, attempt=attempt + 1)
                else:
                    log.warning("webhook %s given up after %d attempts: %s", member, attempt + 1, error)
        return attempted

    def send(self, url: str, owner: str, event: str, job: Any) -> None:
        check_url(url, self.settings.webhook_allow_host_set)
        data = {name: getattr(job, name) for name in ("id", "kind", "status", "model", "progress", "result", "error")}
        kind = "job.progress" if event == "progress" else f"job.{job.status}"
        # the same id for every attempt of one message, as Standard Webhooks ask (receivers deduplicate by it)
        position = job.progress.get("step", job.progress.get("iteration", 0)) if event == "progress" else ""
        timestamp, message_id = int(time.time()), f"msg_{job.id}_{event}{position}"
        body = json.dumps({"type": kind, "timestamp": timestamp, "data": data}).encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "HarmoniCa-Serve-Webhooks",
            "webhook-id": message_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(secret_for(owner, self.settings), message_id, timestamp, body),
        }
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        with _opener.open(request, timeout=self.settings.webhook_timeout_seconds) as response:
            if not 200 <= response.status < 300:
                raise urllib.error.HTTPError(url, response.status, "not a 2xx answer", response.headers, None)

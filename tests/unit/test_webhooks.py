"""Webhook signing follows Standard Webhooks, and URLs that reach non-public addresses are refused."""

from __future__ import annotations

import pytest

from app.contract.settings import Settings
from app.contract.webhooks import check_url, secret_for, sign


def test_signatures_match_the_standard_webhooks_example():
    # the example of https://github.com/standard-webhooks/standard-webhooks/blob/main/spec/standard-webhooks.md
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    signature = sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}')
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_each_key_has_its_own_secret():
    settings = Settings(_env_file=None, webhook_secret="server")
    assert secret_for("alice", settings).startswith("whsec_")
    assert secret_for("alice", settings) == secret_for("alice", settings) != secret_for("bob", settings)
    assert secret_for("alice", settings) != secret_for("alice", Settings(_env_file=None, webhook_secret="other"))


PRIVATE = {
    "http://10.0.0.8/h": "10.0.0.8",
    "http://127.0.0.1:8000/h": "127.0.0.1",
    "http://169.254.169.254/latest": "169.254.169.254",  # cloud metadata
    "http://[::1]/h": "::1",
    "http://0.0.0.0/h": "0.0.0.0",
    "http://224.0.0.1/h": "224.0.0.1",
    "https://192.168.1.1/h": "192.168.1.1",
    "http://[fd00::1]/h": "fd00::1",
}


@pytest.mark.parametrize("url", PRIVATE)
def test_non_public_addresses_are_refused_unless_allowed(url):
    with pytest.raises(ValueError, match="private, loopback, link-local or reserved"):
        check_url(url, set())
    check_url(url, {PRIVATE[url]})


def test_only_http_urls_with_a_host_are_webhooks():
    for url in ("ftp://example.com/x", "file:///etc/passwd", "http:///nohost", "example.com/hook"):
        with pytest.raises(ValueError, match="http"):
            check_url(url, set())
    check_url("https://93.184.216.34/hook", set())  # a public address

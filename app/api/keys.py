"""API keys: only SHA-256 hashes are configured; a request's bearer key is hashed and looked up.

`python -m app.api.keys NAME` prints a fresh key (give it to the user) and the `NAME:sha256` line to
put in `HARMONICA_API_KEYS` or the file named by `HARMONICA_API_KEYS_FILE`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import sys

from app.contract.registry import KEY_NAME
from app.contract.settings import Settings

_ENTRY = re.compile(rf"^(?P<name>{KEY_NAME.pattern}):(?P<digest>[0-9a-f]{{64}})$")


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def load_keys(settings: Settings) -> dict[str, str]:
    """Hash -> key name, from the environment and the keys file; a malformed entry stops the start."""
    lines = [entry.strip() for entry in settings.api_keys.split(",")]
    if settings.api_keys_file is not None:
        lines += [line.strip() for line in settings.api_keys_file.read_text().splitlines()]
    keys = {}
    for line in lines:
        if not line or line.startswith("#"):
            continue
        match = _ENTRY.match(line)
        if match is None:
            hint = "see `python -m app.api.keys`"
            raise ValueError(f"API key entry {line[:20]!r}... is not `name:<64 hex sha256>`; {hint}")
        keys[match["digest"]] = match["name"]
    return keys


def identify(keys: dict[str, str], presented: str) -> str | None:
    """The key's name, or None; compares digests in constant time."""
    candidate = digest(presented)
    for known, name in keys.items():
        if hmac.compare_digest(known, candidate):
            return name
    return None


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not KEY_NAME.fullmatch(argv[0]):
        usage = "usage: python -m app.api.keys NAME   (NAME: letters, digits, _ . -, not starting with .)"
        print(usage, file=sys.stderr)
        return 2
    key = "hk_" + secrets.token_urlsafe(32)
    print(f"key (give to the client; it is not stored): {key}")
    print(f"entry for HARMONICA_API_KEYS or the keys file: {argv[0]}:{digest(key)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""HTTP basic authentication for the web page with a scrypt password hash (hashlib, no extra dependency).

Make a hash with ``python3 -m edge.web.auth`` (asks twice) or ``printf %s 'secret' | python3 -m edge.web.auth
--stdin`` and put the printed line in ``[web]``. The hash format is ``scrypt$N$r$p$<salt b64>$<key b64>``.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import getpass
import hashlib
import hmac
import os
import sys
import threading
import time

N, R, P = 2**14, 8, 1  # 16 MiB and tens of ms per check: cheap for us, costly to brute-force
KEY_LEN = 32
_MAXMEM = 128 * 2**20


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def make_hash(password: str, *, n: int = N, r: int = R, p: int = P) -> str:
    salt = os.urandom(16)
    key = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=KEY_LEN, maxmem=_MAXMEM)
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(key)}"


def parse_hash(text: str) -> tuple[int, int, int, bytes, bytes]:
    """(n, r, p, salt, key) of a hash made by make_hash; ValueError (without the value) if malformed."""
    parts = text.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        raise ValueError("expected scrypt$N$r$p$salt$key")
    try:
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt = base64.b64decode(parts[4], validate=True)
        key = base64.b64decode(parts[5], validate=True)
    except (ValueError, binascii.Error):
        raise ValueError("expected scrypt$N$r$p$salt$key with integer N, r, p and base64 salt and key") from None
    # Bounded so that a hostile config cannot make each login cost seconds or gigabytes.
    if n < 2**10 or n > 2**20 or n & (n - 1):
        raise ValueError("N must be a power of two from 1024 to 1048576")
    if not 1 <= r <= 32 or not 1 <= p <= 16 or 128 * n * r * p > _MAXMEM:
        raise ValueError("r must be 1..32, p 1..16, and 128*N*r*p at most 128 MiB")
    if not 8 <= len(salt) <= 64 or not 16 <= len(key) <= 64:
        raise ValueError("salt must be 8..64 bytes and key 16..64 bytes")
    return n, r, p, salt, key


def verify(password: str, stored: str) -> bool:
    n, r, p, salt, key = parse_hash(stored)
    got = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=len(key), maxmem=_MAXMEM)
    return hmac.compare_digest(got, key)


class BasicAuth:
    """Checks ``Authorization: Basic`` headers against one user and a scrypt hash.

    Browsers send the password with every request (the page polls), so a credential that passed is
    remembered by its SHA-256 for ``cache_s``. One scrypt runs at a time, followed by a pause twice as long
    as it took: a flood of wrong passwords costs at most a third of one core, whatever the hardware, and
    requests that carry the same credential as one being checked wait for that answer instead of another scrypt.
    """

    def __init__(self, username: str, password_hash: str, cache_s: float = 600.0, max_cached: int = 64):
        parse_hash(password_hash)
        self.username = username
        self._hash = password_hash
        self._cache_s = cache_s
        self._max_cached = max_cached
        self._good: dict[bytes, float] = {}
        self._lock = threading.Lock()
        self._scrypt = threading.Lock()
        self._next_scrypt = 0.0

    def check(self, header: str | None) -> bool:
        if not header or len(header) > 1024:
            return False
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        digest = hashlib.sha256(value.strip().encode("utf-8", "replace")).digest()
        if self._cached(digest):
            return True
        try:
            user, sep, password = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
        except (ValueError, binascii.Error, UnicodeDecodeError):
            return False
        if not sep:
            return False
        with self._scrypt:
            if self._cached(digest):  # checked by the request we waited for (a page loads several at once)
                return True
            time.sleep(max(0.0, self._next_scrypt - time.monotonic()))
            t0 = time.monotonic()
            ok = verify(password, self._hash)
            self._next_scrypt = time.monotonic() + 2 * (time.monotonic() - t0)
            ok = hmac.compare_digest(user.encode("utf-8"), self.username.encode("utf-8")) and ok
            if ok:
                self._remember(digest)
        return ok

    def _cached(self, digest: bytes) -> bool:
        with self._lock:
            until = self._good.get(digest)
            return until is not None and until > time.monotonic()

    def _remember(self, digest: bytes) -> None:
        now = time.monotonic()
        with self._lock:
            if len(self._good) >= self._max_cached:
                self._good = {d: t for d, t in self._good.items() if t > now}
                if len(self._good) >= self._max_cached:
                    self._good.clear()
            self._good[digest] = now + self._cache_s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m edge.web.auth",
                                 description="Print a [web] password_hash line for fer-edge's web page.")
    ap.add_argument("--stdin", action="store_true", help="read the password from the first line of stdin")
    args = ap.parse_args(argv)
    if args.stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            print("the passwords differ; nothing written", file=sys.stderr)
            return 2
    if len(password) < 8:
        print("use at least 8 characters", file=sys.stderr)
        return 2
    print(f'password_hash = "{make_hash(password)}"')
    return 0


if __name__ == "__main__":
    sys.exit(main())

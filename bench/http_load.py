"""A bounded load of signed-in clients against the web app, on loopback only.

Each client signs in once (with the login form's CSRF token), then requests
its share of paths; the run stops after `requests_per_client` requests each
or `seconds`, whichever comes first. Used by the load test and the benchmark.
"""

from __future__ import annotations

import http.cookiejar
import ipaddress
import json
import re
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Callable

_TOKEN = re.compile(r'name="csrf_token" value="([^"]+)"')


@dataclass
class LoadResult:
    latencies_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]

    @property
    def requests_per_s(self) -> float:
        return len(self.latencies_ms) / self.seconds if self.seconds else 0.0

    def summary(self) -> dict:
        return {"requests": len(self.latencies_ms), "errors": len(self.errors), "seconds": round(self.seconds, 2),
                "requests_per_s": round(self.requests_per_s, 1), "p50_ms": round(self.percentile(50), 2),
                "p99_ms": round(self.percentile(99), 2)}


def is_loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def signed_in_opener(base_url: str, username: str, password: str) -> urllib.request.OpenerDirector:
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    page = opener.open(f"{base_url}/login", timeout=30).read().decode()
    token = _TOKEN.search(page)
    if token is None:
        raise RuntimeError("the login page has no CSRF token")
    form = urllib.parse.urlencode({"csrf_token": token.group(1), "username": username, "password": password})
    response = opener.open(f"{base_url}/login", data=form.encode(), timeout=30)
    if response.geturl().rstrip("/").endswith("/login"):
        raise RuntimeError(f"could not sign in as {username!r}")
    return opener


def cookies(opener: urllib.request.OpenerDirector) -> list[http.cookiejar.Cookie]:
    """The cookies a `signed_in_opener` holds (its session)."""
    return [c for handler in opener.handlers if isinstance(handler, urllib.request.HTTPCookieProcessor)
            for c in handler.cookiejar]


def run(base_url: str, username: str, password: str, paths: list[str], clients: int = 32,
        requests_per_client: int = 50, seconds: float = 30.0,
        check: Callable[[str, dict], str | None] | None = None) -> LoadResult:
    """`clients` threads, each signed in, each requesting paths round robin. `check(path, json)`
    returns an error message for a wrong answer, or None."""
    if not is_loopback(base_url):
        raise ValueError(f"load is only sent to loopback addresses, not {base_url!r}")
    result = LoadResult()
    lock = threading.Lock()
    openers = [signed_in_opener(base_url, username, password) for _ in range(clients)]
    start = threading.Barrier(clients + 1)
    deadline: list[float] = []

    def client(index: int) -> None:
        opener = openers[index]
        start.wait()
        for n in range(requests_per_client):
            if time.perf_counter() > deadline[0]:
                return
            path = paths[(index + n) % len(paths)]
            began = time.perf_counter()
            try:
                with opener.open(base_url + path, timeout=30) as response:
                    body = response.read()
                    status = response.status
                elapsed = (time.perf_counter() - began) * 1000
                problem = None if status == 200 else f"{path}: HTTP {status}"
                if problem is None and check is not None:
                    problem = check(path, json.loads(body))
            except Exception as exc:  # an HTTP error status, a refused or reset connection
                elapsed, problem = (time.perf_counter() - began) * 1000, f"{path}: {exc}"
            with lock:
                result.latencies_ms.append(elapsed)
                if problem:
                    result.errors.append(problem)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    deadline.append(time.perf_counter() + seconds)
    began = time.perf_counter()
    start.wait()
    for thread in threads:
        thread.join(seconds + 60)
    result.seconds = time.perf_counter() - began
    return result

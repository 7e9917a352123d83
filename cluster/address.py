"""Is a Ray cluster there? Every command that takes `--address` asks this first, in seconds, the same way.

Two kinds of address name a Ray cluster:
- the dashboard, `http://HEAD:8265` (`fmrilm submit`, `fmrilm jobs`): `probe_dashboard` GETs /api/version;
- the cluster itself, `HOST:PORT` of its GCS (6379 by default), `ray://HOST:PORT` or `auto` (the cluster `ray start`
  recorded on this machine), as `ray.init` takes it (`fmrilm corpus build --address`): `probe_ray` opens a TCP
  connection to it.

Both wait at most PROBE_TIMEOUT_S and fail with a one-line `InputError` that names the address: without them, a
wrong address is a progress bar, Ray's retry warnings and a failure a minute or more later. A cluster whose dashboard
asks for a Ray auth token (Ray 2.52+ token authentication) gets the one Ray's own tools would use: RAY_AUTH_TOKEN,
else the file at RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token.
"""

from __future__ import annotations

import os
import socket
import urllib.error
import urllib.request
from pathlib import Path

from fmrilm_core.errors import InputError

DEFAULT_DASHBOARD = "http://127.0.0.1:8265"
PROBE_TIMEOUT_S = 3.0


def unreachable(what: str, address: str, reason: object, hint: str) -> InputError:
    """The one error of an address nothing answers at."""
    return InputError(f"no {what} answers at {address} ({reason}); {hint}")


# ---- the dashboard (Ray Jobs) ----------------------------------------------------------------------------------

def resolve_address(address: str | None = None) -> str:
    """The dashboard URL: `address`, else $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS, else the local default;
    HOST:PORT gets http:// in front."""
    raw = (address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
           or DEFAULT_DASHBOARD).strip()
    if raw == "auto" or raw.startswith("ray://"):
        raise InputError(f"address {raw!r}: give the Ray dashboard's HTTP address, e.g. http://HEAD:8265")
    if "://" not in raw:
        raw = f"http://{raw}"
    if not raw.startswith(("http://", "https://")):
        raise InputError(f"address {raw!r}: give the Ray dashboard's HTTP address, e.g. http://HEAD:8265")
    return raw.rstrip("/")


def ray_auth_token() -> tuple[str, str] | None:
    """(token, where it came from), looked up where Ray's own tools look, or None."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    candidates = [("RAY_AUTH_TOKEN_PATH", os.environ.get("RAY_AUTH_TOKEN_PATH")),
                  ("~/.ray/auth_token", str(Path.home() / ".ray" / "auth_token"))]
    for source, path in candidates:
        if path and Path(path).is_file():
            token = Path(path).read_text().strip()
            if token:
                return token, source if source.startswith("~") else f"{source}={path}"
    return None


def _get_version(address: str, headers: dict[str, str]) -> int:
    """HTTP status of GET /api/version; InputError when nothing answers in time."""
    request = urllib.request.Request(f"{address}/api/version", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=PROBE_TIMEOUT_S) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise unreachable("Ray dashboard", address, getattr(exc, "reason", exc),
                          "is the cluster up, and is this the dashboard address (http://HEAD:8265)?") from None


def probe_dashboard(address: str) -> dict[str, str]:
    """Check within seconds that a Ray dashboard answers at `address` (a resolved URL); returns the HTTP headers its
    Jobs API needs (an auth token when the cluster asks for one)."""
    status = _get_version(address, {})
    headers: dict[str, str] = {}
    if status == 401:
        found = ray_auth_token()
        if found is None:
            raise InputError(f"the Ray cluster at {address} requires an auth token: set RAY_AUTH_TOKEN_PATH (or "
                             "RAY_AUTH_TOKEN) to the cluster's token")
        token, source = found
        headers = {"Authorization": f"Bearer {token}"}
        status = _get_version(address, headers)
        if status in (401, 403):
            raise InputError(f"the Ray cluster at {address} rejected the auth token from {source}")
    if status != 200:
        raise InputError(f"{address}/api/version answered HTTP {status}: not a Ray dashboard?")
    return headers


# ---- the cluster (ray.init) ------------------------------------------------------------------------------------

def _host_port(address: str) -> tuple[str, int] | None:
    scheme, sep, rest = address.partition("://")
    if not sep:
        rest = address
    elif scheme != "ray":  # an http:// dashboard is not what ray.init connects to
        return None
    host, sep, port = rest.rstrip("/").rpartition(":")
    if not sep or not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _recorded_cluster() -> str | None:
    """The address `ray.init(address="auto")` would use: $RAY_ADDRESS, else the cluster `ray start` recorded on
    this machine (Ray's own lookup), None when there is none."""
    try:
        from ray._private.services import canonicalize_bootstrap_address
    except ImportError:  # pragma: no cover - a Ray without it: let ray.init find it
        return "auto"
    try:
        return canonicalize_bootstrap_address("auto")
    except Exception:  # Ray's "could not find any running Ray instance" among others
        return None


def probe_ray(address: str | None) -> str | None:
    """Check within seconds that a Ray cluster listens at `address` (as `ray.init` takes it; None: $RAY_ADDRESS,
    and with neither a local Ray is started, which needs no check). Returns the address."""
    given = address or os.environ.get("RAY_ADDRESS")
    if not given or given == "local":
        return address
    target = given
    if given == "auto":
        target = _recorded_cluster()
        if target is None:
            raise InputError("address 'auto': no running Ray cluster is recorded on this machine (start one with "
                             "`ray start --head`, or give its HOST:PORT)")
        if target == "auto":  # pragma: no cover
            return address
    parsed = _host_port(target)
    if parsed is None:
        raise InputError(f"address {given!r}: give the Ray cluster as HOST:PORT (its GCS port, 6379 by default), "
                         "ray://HOST:PORT or auto")
    try:
        with socket.create_connection(parsed, timeout=PROBE_TIMEOUT_S):
            pass
    except OSError as exc:
        named = given if given == target else f"{target} ({given})"
        reason = exc.strerror or type(exc).__name__.replace("Error", "").lower() or exc
        raise unreachable("Ray cluster", named, reason,
                          "is the cluster up, and is this its address (HOST:6379, as `ray start --head` prints)?"
                          ) from None
    return address

"""Who may call what, decided on the server for every event (no UI code here).

Roles:

- ``public``: anyone who can reach the app (generation, the comparison grid, voting,
  reading finished runs). Voting has its own voter checks (compare_tab/study.py).
- ``owner``: the study's owner: the study results and the CSV export. The owner gives
  the token in HYPERSD_STUDY_OWNER_TOKEN; on an app that is not public, a caller on the
  machine itself (loopback socket peer) is the owner too.
- ``training``: the Train tab's controls (settings check, start, stop, resume, chain);
  refused whenever training is off (--public, a Space).

A client's address is the socket peer, or, behind ``trusted_proxies`` proxies, the entry
those proxies wrote into X-Forwarded-For: counted from the right, as web frameworks do
(werkzeug's ProxyFix, Django's and Rails' trusted-proxy settings), so entries a client
writes itself are never read.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
from collections.abc import Mapping

from hypersd_core.app.service import AppSettings

ROLES = ("public", "owner", "training")
OWNER_REFUSED = ("The study's results and export are for the study owner: enter the owner "
                 "token (HYPERSD_STUDY_OWNER_TOKEN on the server), or open the app on the "
                 "machine it runs on.")


def client_address(headers: Mapping[str, str] | None, peer: str | None,
                   trusted_proxies: int = 0) -> str | None:
    """The client's address: the socket ``peer``, or with ``trusted_proxies`` = N > 0 the
    N-th X-Forwarded-For entry from the right (the one the outermost trusted proxy saw).
    With fewer entries than trusted proxies the header is not trusted at all."""
    if trusted_proxies > 0 and headers is not None:
        hops = [h.strip() for h in (headers.get("x-forwarded-for") or "").split(",") if h.strip()]
        if len(hops) >= trusted_proxies:
            return hops[-trusted_proxies]
    return peer or None


def is_loopback(address: str | None) -> bool:
    try:
        return address is not None and ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


def is_owner(settings: AppSettings, peer: str | None, token: str | None) -> bool:
    """True for the owner's token (compared in constant time), or a loopback peer of an
    app that is not public. ``peer`` is the socket peer, never a forwarded address."""
    if settings.owner_token and isinstance(token, str) and token:
        if hmac.compare_digest(token.encode(), settings.owner_token.encode()):
            return True
    return not settings.public and is_loopback(peer)


def refusal(role: str, settings: AppSettings, peer: str | None, token: str | None = None) -> str:
    """Why a call of ``role`` is refused ('' when it may run)."""
    if role not in ROLES:
        raise ValueError(f"unknown access role {role!r}; one of {ROLES}")
    if role == "training":
        return settings.training_disabled_reason
    if role == "owner" and not is_owner(settings, peer, token):
        return OWNER_REFUSED
    return ""


# absolute POSIX paths (not URLs): "/srv/app/runs/x" -> "x"
_ABS_PATH = re.compile(r"(?<![\w:/.~-])/(?:[^\s/'\"`:,;()<>\[\]]+/)+([^\s/'\"`:,;()<>\[\]]*)")


def scrub_paths(message: str) -> str:
    """``message`` with every absolute server path cut to its last part (errors shown to
    clients must not map the server's folders)."""
    return _ABS_PATH.sub(lambda m: m.group(1) or ".", message)


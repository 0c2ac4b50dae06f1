"""Browser sessions for the web gallery: a signed, encrypted cookie set when a page is served, and
a guard that takes a POST only from the gallery's own pages (Origin checked) in a live session.

Questions and their answers belong to the session that asked: the queue's per-user limits count
per session, and a job's answer is shown only to that session.
"""

import hashlib
import ipaddress
import os
import secrets
import tempfile
from pathlib import Path

from aiohttp import web
from aiohttp_session import Session
from aiohttp_session.cookie_storage import EncryptedCookieStorage
from sqlalchemy.engine import make_url
from yarl import URL

from core.settings import Settings

COOKIE_NAME = "talkmosaic_session"
SESSION_DAYS = 30
SECRET_FILE = "gallery-secret"
# Methods that change something; every other method only reads.
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain"})

CROSS_SITE = "Questions can only be sent from this gallery's own pages."
NO_SESSION = "Your gallery session has expired or cookies are off; reload the page and try again."


def session_key(settings: Settings) -> bytes:
    """The 32-byte key that seals session cookies.

    GALLERY_SECRET if set (every host behind one address must share it); otherwise a random key
    created once beside the SQLite database (or in the data directory) and kept there, so a
    restart keeps everyone's sessions."""
    if settings.gallery_secret is not None:
        secret = settings.gallery_secret.get_secret_value().encode()
    else:
        secret = _stored_secret(_secret_path(settings))
    return hashlib.sha256(b"talkmosaic gallery session\0" + secret).digest()


def _secret_path(settings: Settings) -> Path:
    url = make_url(settings.db_url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        return Path(url.database).parent / SECRET_FILE
    return settings.data_dir / SECRET_FILE


def _stored_secret(path: Path) -> bytes:
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written whole under a temporary name, then linked into place: two processes starting at
    # once agree on one key (the loser of the link reads the winner's), and nobody reads half.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-secret-")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32))
        os.chmod(tmp, 0o600)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
    finally:
        Path(tmp).unlink(missing_ok=True)
    return bytes.fromhex(path.read_text().strip())


def session_middlewares(settings: Settings) -> list:
    """The one middleware: a POST must come from the gallery's own origin in a live session,
    and a page served starts (or renews) the session. Other requests pass straight through:
    tile look-ups are the hot path and never read the cookie."""
    public = settings.gallery_public_url
    storage = EncryptedCookieStorage(
        session_key(settings),
        cookie_name=COOKIE_NAME,
        max_age=SESSION_DAYS * 24 * 3600,
        httponly=True,
        # Lax, not Strict: a link to the gallery from a chat must arrive with its session, or
        # the page would start a new one and its earlier questions would be out of reach.
        samesite="Lax",
        secure=bool(public and public.lower().startswith("https://")),
    )

    @web.middleware
    async def sessions(request: web.Request, handler):
        request[_STORAGE] = storage
        if request.method in UNSAFE_METHODS:
            if _request_origin(request) not in _own_origins(request, settings):
                raise web.HTTPForbidden(text=CROSS_SITE)
            if "sid" not in await _session(request):
                raise web.HTTPForbidden(text=NO_SESSION)
        response = await handler(request)
        if (request.method == "GET" and response.status == 200
                and response.content_type == "text/html"):
            session = await _session(request)
            if "sid" not in session:
                session["sid"] = secrets.token_urlsafe(24)
            # Sealed again on every page view, so the 30 days count from the last visit.
            await storage.save_session(request, response, session)
        return response

    return [sessions]


_STORAGE = web.RequestKey("gallery_session_storage", EncryptedCookieStorage)
_SESSION = web.RequestKey("gallery_session", Session)


async def _session(request: web.Request) -> Session:
    """This request's session, read from its cookie once (a new, empty one without it)."""
    session = request.get(_SESSION)
    if session is None:
        session = request[_SESSION] = await request[_STORAGE].load_session(request)
    return session


def _origin(text: str | None) -> str | None:
    """scheme://host:port of an absolute http(s) URL, with the port always written."""
    if not text:
        return None
    try:
        url = URL(text)
    except ValueError:
        return None
    if not url.absolute or url.scheme not in ("http", "https") or not url.host:
        return None
    return f"{url.scheme}://{url.host}:{url.port}"


def _request_origin(request: web.Request) -> str | None:
    # Browsers send Origin on every POST; Referer is the fallback for the few that strip it.
    origin = request.headers.get("Origin")
    return _origin(origin) if origin is not None else _origin(request.headers.get("Referer"))


def _own_origins(request: web.Request, settings: Settings) -> set[str]:
    allowed = set()
    if public := _origin(settings.gallery_public_url):
        allowed.add(public)
    # The address the browser used counts only when it names this machine by number or as
    # localhost: any other name must be GALLERY_PUBLIC_URL, or a DNS-rebinding page whose Host
    # and Origin agree would pass.
    # The Host header itself: without one, aiohttp's request.host would ask the resolver.
    host_header = request.headers.get("Host")
    own = _origin(f"{request.scheme}://{host_header}") if host_header else None
    if own is not None:
        host = URL(own).host
        if host in LOOPBACK_NAMES or host == settings.gallery_host or _is_ip(host):
            allowed.add(own)
    return allowed


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


async def asker_id(request: web.Request) -> str:
    """The queue's user for this browser session (the guard has made sure there is one)."""
    session = await _session(request)
    return _user_for(session["sid"])


async def viewer_id(request: web.Request) -> str | None:
    """The queue's user for this request's session, or None without one."""
    session = await _session(request)
    sid = session.get("sid")
    return None if sid is None else _user_for(sid)


def _user_for(sid: str) -> str:
    # A digest, so the database never holds the cookie's secret itself.
    return "web:" + hashlib.sha256(sid.encode()).hexdigest()[:32]


"""`cbir review`: the review application, a Starlette app served by uvicorn on this machine.

Security, for a server that holds an archive's scans and writes its decisions:

* It listens on 127.0.0.1 unless told otherwise. Every request's `Host` must name this server
  (127.0.0.1, localhost or [::1] with its port), so a page of another site whose name is made to
  resolve to 127.0.0.1 (DNS rebinding) gets nothing.
* Bound to any other address it needs a token (`CBIR_REVIEW_TOKEN`, or one made at start and
  printed once) on every request: given once in the URL it is kept in a same-site cookie.
* A request that writes (POST) must come from this server's own pages: a foreign `Origin` or a
  `Sec-Fetch-Site` other than same-origin is refused, and its body must be JSON (which a form
  of another site cannot send).
* Pictures are served by content id only (`images.py`), never by a path; names are shown as
  text (Jinja autoescape, `textContent`); the Content-Security-Policy allows only this
  server's own script, style sheet, pictures and API.

Decisions are appended to the decisions log (`store/decisions.py`), one part per request, so
two tabs or two reviewers never lose each other's work.

Longer than 400 lines: the routes, the guard every request passes, and the server's start and
stop.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import secrets
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..errors import CbirError
from ..store import decisions as D
from ..store.layout import layout
from ..store.pairs import scores_fingerprint
from . import images, queue

if TYPE_CHECKING:
    from ..config import Settings

HERE = Path(__file__).resolve().parent
TOKEN_ENV = "CBIR_REVIEW_TOKEN"
TOKEN_COOKIE = "cbir_review_token"
TOKEN_HEADER = "x-cbir-token"
MIN_TOKEN = 16  # characters of a token given in the environment
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SAFE_METHODS = ("GET", "HEAD")
MAX_BODY = 16384  # bytes of a decision request

_ENV = Environment(
    loader=FileSystemLoader(HERE / "templates"),
    autoescape=True,
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ReviewConfig:
    """How one server runs: where it listens, who reviews, the token (None on loopback)."""

    host: str
    port: int
    reviewer: str
    token: str | None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def allowed_hosts(self) -> set[str] | None:
        """The Host headers a request may carry; None: any (a token guards the server)."""
        if self.token is not None:
            return None
        names = {"127.0.0.1", "localhost", "[::1]", self.host, f"[{self.host}]"}
        out = {f"{n}:{self.port}" for n in names}
        if self.port == 80:
            out |= names
        return out


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class Guard(BaseHTTPMiddleware):
    """The checks of every request (Host, token, cross-site writes) and the security headers."""

    def __init__(self, app: Any, config: ReviewConfig) -> None:
        super().__init__(app)
        self.config = config

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        refused = self.refusal(request)
        if isinstance(refused, Response):
            response = refused
        else:
            response = await call_next(request)
        h = response.headers
        h["Content-Security-Policy"] = CSP
        h["X-Content-Type-Options"] = "nosniff"
        h["Referrer-Policy"] = "no-referrer"
        h["X-Frame-Options"] = "DENY"
        h["Cross-Origin-Resource-Policy"] = "same-origin"
        if "cache-control" not in h:
            h["Cache-Control"] = "no-store"
        return response

    def refusal(self, request: Request) -> Response | None:
        cfg = self.config
        host = request.headers.get("host", "")
        allowed = cfg.allowed_hosts()
        if allowed is not None and host.lower() not in allowed:
            return PlainTextResponse("refused: this server answers only to its own address", 421)
        if cfg.token is not None:
            given = request.query_params.get("token")
            if given is not None and request.method in SAFE_METHODS:
                if not hmac.compare_digest(given.encode(), cfg.token.encode()):
                    return PlainTextResponse("refused: wrong token", 401)
                query = {k: v for k, v in request.query_params.items() if k != "token"}
                target = request.url.path + (f"?{urlencode(query)}" if query else "")
                response = RedirectResponse(target, 303)
                response.set_cookie(
                    TOKEN_COOKIE, cfg.token, httponly=True, samesite="strict", path="/"
                )
                return response
            presented = request.headers.get(TOKEN_HEADER) or request.cookies.get(TOKEN_COOKIE)
            if presented is None or not hmac.compare_digest(presented.encode(), cfg.token.encode()):
                return PlainTextResponse(
                    "refused: this server needs its token (open the URL it printed at start)",
                    401,
                )
        if request.method not in SAFE_METHODS:
            site = request.headers.get("sec-fetch-site")
            if site is not None and site not in ("same-origin", "none"):
                return _error(403, "refused: a cross-site request")
            origin = request.headers.get("origin")
            if origin is not None and origin != f"{request.url.scheme}://{host}":
                return _error(403, "refused: a request from another site")
            kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json":
                return _error(415, "refused: a decision is sent as application/json")
        return None


class Review:
    """The routes over one workspace."""

    def __init__(self, settings: Settings, config: ReviewConfig) -> None:
        self.settings = settings
        self.config = config
        self.queue = queue.Queue(settings)

    def thresholds(self) -> tuple[float | None, float | None]:
        from ..steps.calibrate import configured_thresholds

        return configured_thresholds(self.settings)

    def prepare(self) -> None:
        """Read the catalogue and sort the queue now (seconds for a million pairs), so the
        first page is quick; no pairs: one line, before the server starts."""
        self.queue.run(self.threshold(), lambda con: None)

    def threshold(self) -> float:
        pair, _ = self.thresholds()
        return 1.0 if pair is None else pair  # none yet: the strongest pairs first

    # pages
    def index(self, request: Request) -> Response:
        return self._page("review", None)

    def cluster_page(self, request: Request) -> Response:
        return self._page("cluster", int(request.path_params["cluster_id"]))

    def _page(self, view: str, cluster_id: int | None) -> Response:
        html = _ENV.get_template("review.html.j2").render(
            view=view,
            cluster_id="" if cluster_id is None else cluster_id,
            reviewer=self.config.reviewer,
            threshold=self._threshold_text(),
        )
        return HTMLResponse(html)

    def _threshold_text(self) -> str:
        pair, _ = self.thresholds()
        return "not calibrated yet" if pair is None else f"{pair:.4f}"

    # the API
    def api_queue(self, request: Request) -> Response:
        q = request.query_params
        filters = queue.Filters.parse(q)
        after = queue.Cursor.parse(q.get("after", ""))
        limit = queue._int(q, "limit") or queue.PAGE_DEFAULT
        page = self.queue.page(self.threshold(), filters, after, limit)
        return JSONResponse(_jsonable(page))

    def api_progress(self, request: Request) -> Response:
        filters = queue.Filters.parse(request.query_params)
        return JSONResponse(self.queue.progress(self.threshold(), filters))

    def api_clusters(self, request: Request) -> Response:
        return JSONResponse(_jsonable({"clusters": self.queue.clusters(self.threshold())}))

    def api_cluster(self, request: Request) -> Response:
        pair, link = self.thresholds()
        cid = int(request.path_params["cluster_id"])
        threshold = 1.0 if pair is None else pair
        return JSONResponse(_jsonable(self.queue.cluster(threshold, cid, link)))

    async def api_decide(self, request: Request) -> Response:
        body = await _json(request)
        return await _in_thread(self._decide, body)

    def _decide(self, body: dict[str, Any]) -> Response:
        a, b = str(body.get("image_a", "")), str(body.get("image_b", ""))
        verdict = body.get("decision")
        if verdict not in D.VERDICTS:
            return _error(400, f"decision must be one of {', '.join(D.VERDICTS)}")
        if not (images.IMAGE_ID.fullmatch(a) and images.IMAGE_ID.fullmatch(b)):
            return _error(400, "image_a and image_b must be image ids")
        found = self.queue.pair(self.threshold(), a, b)
        if found is None:
            return _error(404, "no such pair among the near-duplicate pairs")
        master = body.get("master") or None
        if master is not None and (verdict != D.SAME or master not in (a, b)):
            return _error(400, "master must be one side of a pair decided same")
        note = body.get("note") or ""
        if not isinstance(note, str):
            return _error(400, "note must be text")
        decision = D.Decision(
            image_a=found["image_a"],
            image_b=found["image_b"],
            decision=verdict,
            path_a=found["path_a"],
            path_b=found["path_b"],
            master=master,
            reviewer=self.config.reviewer,
            note=note,
            model=scores_fingerprint(self.settings),
            score=float(found["score"]),
            source="review",
        )
        D.record(layout(self.settings).decisions_dir, [decision])
        return JSONResponse({"decision_id": decision.decision_id, "decision": verdict})

    async def api_undo(self, request: Request) -> Response:
        body = await _json(request)
        return await _in_thread(self._undo, body)

    def _undo(self, body: dict[str, Any]) -> Response:
        did = str(body.get("decision_id", ""))
        if not did or len(did) > 64:
            return _error(400, "decision_id is missing")
        row = self.queue.logged(self.threshold(), did)
        if row is None or row["decision"] == D.UNDO:
            return _error(404, "no such decision to undo")
        undo = D.Decision(
            image_a=row["image_a"],
            image_b=row["image_b"],
            decision=D.UNDO,
            path_a=row["path_a"],
            path_b=row["path_b"],
            reviewer=self.config.reviewer,
            model=row["model"],
            score=row["score"],
            source="review",
            undoes=did,
        )
        D.record(layout(self.settings).decisions_dir, [undo])
        return JSONResponse({"decision_id": undo.decision_id, "undoes": did})

    def _scan_file(self, image_id: str) -> dict[str, Any] | None:
        return self.queue.scan_file(self.threshold(), image_id)

    def image(self, request: Request) -> Response:
        try:
            side = int(request.path_params["side"])
            image_id = str(request.path_params["image_id"])
            path = images.rendition(self.settings, self._scan_file, image_id, side)
        except images.Missing as exc:
            return PlainTextResponse(exc.reason, exc.status)
        # named by content: the same URL always shows the same picture
        return FileResponse(path, media_type="image/jpeg",
                            headers={"Cache-Control": "private, max-age=86400"})  # fmt: skip


async def _no_icon(request: Request) -> Response:
    return Response(status_code=204)


async def _json(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise queue.BadRequest("the request is too large")
    try:
        body = json.loads(raw or b"{}")
    except ValueError:
        raise queue.BadRequest("the request is not JSON") from None
    if not isinstance(body, dict):
        raise queue.BadRequest("the request is not a JSON object")
    return body


async def _in_thread(fn: Any, *args: Any) -> Any:
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(fn, *args)


def _jsonable(value: Any) -> Any:
    """Rows as JSON: times as ISO text, everything else as it is."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


async def _bad_request(request: Request, exc: Exception) -> Response:
    from ..safetext import printable

    status = 400 if isinstance(exc, queue.BadRequest) else 500
    return _error(status, printable(exc))


def build_app(settings: Settings, config: ReviewConfig) -> Starlette:
    """The review application over the workspace of `settings`."""
    r = Review(settings, config)
    routes = [
        Route("/", r.index),
        Route("/cluster/{cluster_id:int}", r.cluster_page),
        Route("/api/queue", r.api_queue),
        Route("/api/progress", r.api_progress),
        Route("/api/clusters", r.api_clusters),
        Route("/api/cluster/{cluster_id:int}", r.api_cluster),
        Route("/api/decide", r.api_decide, methods=["POST"]),
        Route("/api/undo", r.api_undo, methods=["POST"]),
        Route("/img/{image_id:str}/{side:int}", r.image),
        Route("/favicon.ico", _no_icon),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(Guard, config=config)],
        exception_handlers={CbirError: _bad_request},
    )
    app.state.review = r
    return app


def token_for(host: str) -> str | None:
    """The token a server bound to `host` needs: None on loopback; else `CBIR_REVIEW_TOKEN`, or
    a new random one."""
    if is_loopback(host):
        return None
    given = os.environ.get(TOKEN_ENV)
    if given is None:
        return secrets.token_urlsafe(24)
    if len(given) < MIN_TOKEN or not given.isprintable() or " " in given:
        raise CbirError(
            f"{TOKEN_ENV} must be at least {MIN_TOKEN} printable characters without spaces"
        )
    return given


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on host:port (port 0: a free one), or one line saying why not."""
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], info[1], info[2])
    except OSError as exc:
        raise CbirError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise CbirError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def _server_class() -> type:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, remembering a Ctrl-C: uvicorn catches it, shuts down, then raises
        it again, which does nothing where SIGINT was ignored when the command started (a
        background job, a test runner's worker), and the command would end with status 0."""

        interrupted = False

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            self.interrupted = self.interrupted or sig == signal.SIGINT
            super().handle_exit(sig, frame)

    return Server


def serve(settings: Settings, host: str, port: int, reviewer: str) -> None:
    """Serve the review application until Ctrl-C (KeyboardInterrupt)."""
    import uvicorn  # with Starlette's server parts: only when serving

    _Server = _server_class()
    token = token_for(host)
    sock = listen(host, port)
    try:
        config = ReviewConfig(host, int(sock.getsockname()[1]), reviewer, token)
        app = build_app(settings, config)
        app.state.review.prepare()
        url = config.url
        print(f"cbir review: serving {settings.root} at {url}", flush=True)
        if token is not None:
            print(f"cbir review: open {url}?token={token} (needed from other machines too)")
        print("cbir review: Ctrl-C stops it", file=sys.stderr, flush=True)
        sys.stdout.flush()
        server = _Server(
            uvicorn.Config(
                app,
                log_level="warning",
                access_log=False,
                lifespan="off",
                timeout_graceful_shutdown=2,
            )
        )
        server.run(sockets=[sock])
        if server.interrupted:  # uvicorn stopped cleanly; the command still ends as Ctrl-C does
            raise KeyboardInterrupt
    finally:
        sock.close()

"""The status page at `/`: server-rendered HTML with a little JavaScript (`/ui/app.js`) and a stylesheet
(`/ui/style.css`), all served by the app: no build step, no CDN. The page holds no data: it signs in with an
API key kept in the browser's session storage and reads everything through the public API, like any client.
A strict Content-Security-Policy allows scripts from this origin only."""

from __future__ import annotations

import html
from functools import cache
from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse

router = APIRouter(tags=["status page"])
STATIC = Path(__file__).resolve().parents[2] / "static"
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Amend status</title><link rel="stylesheet" href="/ui/style.css"><script src="/ui/app.js" defer></script></head>
<body>
<header><h1>Amend</h1>
  <nav><button data-show="jobs">Jobs</button><button data-show="adapters">Adapters</button>
  <button data-show="models">Models</button><button data-show="schedules">Schedules</button>
  <button data-show="requests">Deletion requests</button></nav>
  <span class="muted">v{version}</span> <a id="signout">sign out</a></header>
<section id="signin"><h2>Sign in</h2>
  <form id="signin-form"><p class="muted">An API key of your tenant. It stays in this tab's session storage.</p>
  <input id="api-key" type="password" autocomplete="off" placeholder="API key" size="36" required>
  <button class="primary" type="submit">Sign in</button></form><p id="signin-error" class="error"></p></section>
<main id="app" class="hidden">
  <div data-view="jobs"><section><h2>Jobs</h2>
    <div class="filters"><select id="filter-state"><option value="">any state</option>{states}</select>
    <select id="filter-type"><option value="">any type</option>{types}</select>
    <button class="primary" id="refresh">Refresh</button></div><div id="jobs-table"></div></section></div>
  <div data-view="detail" id="detail"></div>
  <div data-view="adapters" id="adapters"></div><div data-view="models" id="models"></div>
  <div data-view="schedules" id="schedules"></div><div data-view="requests" id="requests"></div>
</main></body></html>
"""


def _options(values: tuple[str, ...]) -> str:
    return "".join(f'<option value="{html.escape(v)}">{html.escape(v)}</option>' for v in values)


@router.get("/", response_class=HTMLResponse, summary="The status page (HTML; signs in with an API key)")
async def status_page(request: Request) -> HTMLResponse:
    body = PAGE.format(
        version=html.escape(request.app.version),
        states=_options(("queued", "running", "succeeded", "failed", "cancelled")),
        types=_options(("merge", "compress", "unlearn")),
    )
    return HTMLResponse(body, headers={"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                                       "Cache-Control": "no-cache"})


@cache
def _asset(name: str) -> bytes:
    return (STATIC / name).read_bytes()


@router.get("/ui/app.js", summary="The status page's script", response_class=Response)
async def status_script() -> Response:
    return Response(_asset("app.js"), media_type="text/javascript",
                    headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})


@router.get("/ui/style.css", summary="The status page's stylesheet", response_class=Response)
async def status_style() -> Response:
    return Response(_asset("style.css"), media_type="text/css",
                    headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})

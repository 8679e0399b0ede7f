"""The web console: static files under /ui, same origin as the API, under a strict CSP.

The console is plain HTML, CSS and JavaScript shipped as package data (no build step, no CDN).
It keeps the token in sessionStorage and sends it only in the Authorization header of its fetches.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

from seglock.app.errors import error_responses, not_found

router = APIRouter(tags=["console"])

# Only these files are served: a fixed list, so no path from a request ever reaches the file system.
ASSETS = {
    "console.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
    "sample.png": "image/png",  # a synthetic scene (seglock data synth, seed 7) for the demo models
}
INDEX = "index.html"

CONTENT_SECURITY_POLICY = "; ".join((
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' blob: data:",  # masks arrive as blobs and base64 PNGs
    "connect-src 'self'",
    "font-src 'self'",
    "object-src 'none'",
    "base-uri 'none'",
    "form-action 'none'",  # forms never submit: a token can never land in a URL
    "frame-ancestors 'none'",
))
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=(), usb=()",
    "Cache-Control": "no-cache",
}


@cache
def asset_bytes(name: str) -> bytes:
    return resources.files("seglock.app").joinpath("console", name).read_bytes()


def _page(name: str, media_type: str) -> Response:
    return Response(asset_bytes(name), media_type=media_type, headers=SECURITY_HEADERS)


_HTML = {200: {"content": {"text/html": {}}, "description": "the console's page"}}


@router.get("/ui", summary="The web console", response_class=Response, responses=_HTML)
async def console_page() -> Response:
    return _page(INDEX, "text/html; charset=utf-8")


@router.get("/ui/", summary="The web console (trailing slash)", response_class=Response, responses=_HTML,
            include_in_schema=False)
async def console_page_slash() -> Response:
    return _page(INDEX, "text/html; charset=utf-8")


@router.get("/ui/{asset}", summary="The console's script, style sheet and icon", response_class=Response,
            responses={200: {"content": {media.split(";")[0]: {} for media in ASSETS.values()},
                             "description": "one of console.js, console.css, favicon.svg"},
                       **error_responses(404)})
async def console_asset(asset: str) -> Response:
    media_type = ASSETS.get(asset)
    if media_type is None:
        raise not_found("the console has no such file")
    return _page(asset, media_type)

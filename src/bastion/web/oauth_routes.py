"""Bastion's own client ID metadata document, served at ``/oauth/client-metadata.json``.

An authorization server that supports client ID metadata documents fetches it to learn who Bastion is: the
document's URL is Bastion's client id there. It exists only when ``BASTION_PUBLIC_URL`` is set.
"""

from __future__ import annotations

from typing import Final

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bastion.oauth import registration
from bastion.settings import Settings

__all__ = ["client_metadata_route"]

CACHE_SECONDS: Final = 3600


def client_metadata_route(settings: Settings) -> Route:
    """The route answering ``GET /oauth/client-metadata.json``."""

    async def client_metadata(_request: Request) -> Response:
        if not settings.public_url:
            return JSONResponse({"error": "not_found"}, status_code=404)
        document = {
            "client_id": registration.client_metadata_url(settings.public_url),
            **registration.client_metadata(settings.public_url),
        }
        return JSONResponse(document, headers={"Cache-Control": f"public, max-age={CACHE_SECONDS}"})

    return Route(registration.CLIENT_METADATA_PATH, client_metadata, methods=["GET"])

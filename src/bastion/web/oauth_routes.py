"""Bastion's own client ID metadata document, served at ``/oauth/client-metadata.json``.

An authorization server that supports client ID metadata documents fetches it to learn who Bastion is: the
document's URL is Bastion's client id there. It is built from ``BASTION_PUBLIC_URL``, or when that is unset from
the address ``serve`` listens on, like every other link Bastion hands out.
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
        document = {
            "client_id": registration.client_metadata_url(settings.base_url),
            **registration.client_metadata(settings.base_url),
        }
        return JSONResponse(document, headers={"Cache-Control": f"public, max-age={CACHE_SECONDS}"})

    return Route(registration.CLIENT_METADATA_PATH, client_metadata, methods=["GET"])

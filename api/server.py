"""`docker-http-passthrough serve`: the API on uvicorn."""

from __future__ import annotations

import uvicorn

from api.app import create_app
from shared.settings import Settings


def run(settings: Settings, host: str, port: int) -> None:
    # One process per pod/host; scale out with more replicas behind a load balancer.
    # log_config=None: uvicorn logs through our handlers (text or JSON, LOG_LEVEL).
    uvicorn.run(create_app(settings), host=host, port=port, log_config=None, access_log=False,
                timeout_keep_alive=30)

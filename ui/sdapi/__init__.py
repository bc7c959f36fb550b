"""An AUTOMATIC1111-compatible REST API (`/sdapi/v1/*`) and an asynchronous job API (`/api/v1/jobs`)
on the web UI's own server, described at `/docs` (OpenAPI at `/sdapi/openapi.json`).

    demo.launch(..., prevent_thread_lock=True)
    ui.sdapi.mount(demo.app, demo.ldm_context, Settings(auth=[("user", "pass")]))
    demo.block_thread()

Modules: `models` (request/response bodies), `convert` (A1111 fields -> ldm calls), `controlnet`
(the ControlNet extension's `alwayson_scripts` units and `/controlnet/*` routes), `jobs` (the job
registry and runner), `routes` (the FastAPI router). Requests run on the same per-model queue
as the UI's (`ui.turns`). The access gate (`ui.security`) lets `API_PREFIXES` through without a UI
session; the router checks HTTP Basic itself.
"""
from __future__ import annotations

from fastapi import Depends
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi

from ..state import Context
from .jobs import Jobs
from .routes import Settings, basic_auth, build_router

__all__ = ["mount", "Settings", "API_PREFIXES", "DOCS_PATHS"]

API_PREFIXES = ("/sdapi/", "/api/v1/jobs", "/controlnet/")
OPENAPI = "/sdapi/openapi.json"
DOCS_PATHS = ("/docs",)


def mount(app, ctx: Context, settings: Settings | None = None) -> Jobs:
    """Add the API's routes and its docs to the running Gradio app (`demo.app`); returns the job registry."""
    settings = settings or Settings()
    router, jobs = build_router(ctx, settings)
    app.include_router(router)
    check = basic_auth(settings.auth, settings.backoff)
    schema: dict = {}

    @app.get(OPENAPI, include_in_schema=False, dependencies=[Depends(check)])
    def openapi() -> dict:
        if not schema:
            schema.update(get_openapi(title="ldm: A1111-compatible API", version="1",
                                      description="AUTOMATIC1111's /sdapi/v1 routes and an asynchronous job API.",
                                      routes=router.routes))
        return schema

    @app.get("/docs", include_in_schema=False, dependencies=[Depends(check)])
    def docs():
        return get_swagger_ui_html(openapi_url=OPENAPI, title="ldm API")

    return jobs

"""A real app with the REST API (ui.sdapi) on loopback, as app.py starts it: launch with the security
settings, mount the API, serve. Used by tests/test_sdapi.py and tests/test_jobs_api.py."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from conftest import free_port


@dataclass
class ApiApp:
    demo: Any
    port: int
    ctx: Any
    jobs: Any
    outputs: Any

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.demo.close()


def launch_api(pipes, outputs, *, auth=None, api_auth=None, job_ttl: float = 3600.0, backoff=None, **options) -> ApiApp:
    from ui import build, sdapi
    from ui.security import launch_kwargs
    from ui.state import Options

    opts = Options(outputs=outputs, **options)
    demo = build(pipes, opts)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                **launch_kwargs(auth=auth, max_upload_mb=opts.max_upload_mb, outputs=outputs))
    settings = sdapi.Settings(auth=api_auth if api_auth is not None else (auth or ()), job_ttl=job_ttl,
                              cmd_flags={"model": "tiny"}, event_interval=0.05,
                              **({} if backoff is None else {"backoff": backoff}))
    jobs = sdapi.mount(demo.app, demo.ldm_context, settings)
    return ApiApp(demo, port, demo.ldm_context, jobs, outputs)

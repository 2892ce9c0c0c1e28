"""`samadapt serve`: an HTTP API and an interactive page over one frozen core and a folder of adapters.

`routes` holds the routes both engines serve (`build_api` over a model side: `LocalModel` in this
process, or the Ray replicas of `ray_app`); `app` holds the single-process app (`create_app`), the
background runner used by tests and benchmarks (`background_server`) and the CLI entry
(`run_server`); `api` holds the request/response models and their validation (image decoding with
limits, prompt checks, mask encodings, the body size and time limits); `work` runs the model calls
(one at a time, bounded queue, time limit, cancellation); `guard` holds the Host allowlist, the
cross-origin write check and the request-head timeout;
`static/` holds the page. SECURITY.md at the repository root states the threat model.

Example:
    >>> from samadapt.recipes.serve import create_app
    >>> callable(create_app)
    True
"""
from .app import background_server, create_app, run_server

__all__ = ["create_app", "background_server", "run_server"]

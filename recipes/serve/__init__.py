"""`samadapt serve`: an HTTP API and an interactive page over one frozen core and a folder of adapters.

`app` holds the FastAPI app (`create_app`), the background runner used by tests and benchmarks
(`background_server`) and the CLI entry (`run_server`); `api` holds the request/response models and
their validation (image decoding with limits, prompt checks, mask encodings, the body-size limit);
`static/` holds the page.

Example:
    >>> from samadapt.recipes.serve import create_app
    >>> callable(create_app)
    True
"""
from .app import background_server, create_app, run_server

__all__ = ["create_app", "background_server", "run_server"]

"""`/docs` (Swagger UI) and `/redoc` served with their scripts and styles from this machine, not a CDN.

FastAPI's default pages load Swagger UI and ReDoc from jsDelivr, so they are blank offline or behind a
firewall. The assets come from the `fastapi-offline` package (Swagger UI, Apache-2.0; ReDoc, MIT; the
package itself MIT), installed with the `serve` extra, and are served under `/static-docs/`.
"""
from pathlib import Path

__all__ = ["DOCS_STATIC", "add_offline_docs"]

DOCS_STATIC = "/static-docs"
# the docs pages may load only from this server: ReDoc's sidebar would fetch its vendor's logo from a CDN
DOCS_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; font-src 'self' data:; worker-src 'self' blob:; connect-src 'self'; "
            "frame-ancestors 'none'")


def assets_dir() -> Path:
    """The folder holding swagger-ui-bundle.js, swagger-ui.css, redoc.standalone.js and favicon.png."""
    import fastapi_offline

    return Path(fastapi_offline.__file__).parent / "static"


def add_offline_docs(app, docs_url: str = "/docs", redoc_url: str = "/redoc") -> None:
    """Serve Swagger UI at `docs_url` and ReDoc at `redoc_url` from local assets (the app was made with
    `docs_url=None, redoc_url=None`).

    Args:
        app: the FastAPI app.
        docs_url: where the Swagger UI page goes.
        redoc_url: where the ReDoc page goes.

    Example:
        >>> from fastapi import FastAPI
        >>> from fastapi.testclient import TestClient
        >>> app = FastAPI(docs_url=None, redoc_url=None); add_offline_docs(app)
        >>> html = TestClient(app).get("/docs").text
        >>> "/static-docs/swagger-ui-bundle.js" in html, "cdn.jsdelivr" in html
        (True, False)
    """
    from fastapi import Request
    from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
    from fastapi.responses import HTMLResponse
    from fastapi.staticfiles import StaticFiles

    app.mount(DOCS_STATIC, StaticFiles(directory=str(assets_dir())), name="static-docs")

    @app.get(docs_url, include_in_schema=False)
    async def swagger(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        page = get_swagger_ui_html(openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} - API",
                                   swagger_js_url=f"{root}{DOCS_STATIC}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{root}{DOCS_STATIC}/swagger-ui.css",
                                   swagger_favicon_url=f"{root}{DOCS_STATIC}/favicon.png")
        page.headers["Content-Security-Policy"] = DOCS_CSP
        return page

    @app.get(redoc_url, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        page = get_redoc_html(openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} - ReDoc",
                              redoc_js_url=f"{root}{DOCS_STATIC}/redoc.standalone.js",
                              redoc_favicon_url=f"{root}{DOCS_STATIC}/favicon.png", with_google_fonts=False)
        page.headers["Content-Security-Policy"] = DOCS_CSP
        return page

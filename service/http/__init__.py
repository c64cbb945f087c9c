"""The HTTP layer: the FastAPI app, its routes, uploads, errors, middleware and OpenAPI document.

It may import every other package of the service; no other package of the service imports it (the command line
starts it)."""

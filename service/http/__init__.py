"""The HTTP layer: the FastAPI app, its routes, uploads, errors, middleware and OpenAPI document.

It may import every other package of the service; nothing outside it imports it (but the command line)."""

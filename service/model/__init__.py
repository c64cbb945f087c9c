"""The served models: loading (weights sources, labels, device), what a model is made of (anatomy, head) and the
per-lane copies that run it. Imports nothing else of the service but its configuration."""

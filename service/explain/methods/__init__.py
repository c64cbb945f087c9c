"""One module per explanation method; each registers itself with `service.explain.registry.register_method`."""

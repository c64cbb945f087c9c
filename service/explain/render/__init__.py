"""From a map on the token or feature grid to what the API returns: crop geometry, projection, PNGs, raw arrays."""

"""goodspec.cluster."""

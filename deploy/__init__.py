"""goodspec.deploy."""

"""goodspec.protos."""

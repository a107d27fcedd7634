"""goodspec.scheduler."""

"""goodspec.workers."""

"""goodspec.tests."""

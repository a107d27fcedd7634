"""Generated gRPC stubs for goodspec.v1 (from generation.proto; regenerate with the command in tests/cluster/test_protos.py)."""

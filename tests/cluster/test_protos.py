"""The committed stubs are what generation.proto compiles to, and the .proto ships in the package."""

import importlib.resources
from pathlib import Path

PROTOS = Path(__file__).resolve().parents[2] / "protos"


def test_committed_stubs_match_the_proto(tmp_path):
    from grpc_tools import protoc

    rc = protoc.main(["protoc", f"-I{PROTOS}", f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}",
                      f"--pyi_out={tmp_path}", str(PROTOS / "goodspec/v1/generation.proto")])
    assert rc == 0
    for name in ("generation_pb2.py", "generation_pb2_grpc.py", "generation_pb2.pyi"):
        assert (tmp_path / "goodspec/v1" / name).read_text() == (PROTOS / "goodspec/v1" / name).read_text(), \
            f"{name} is stale: regenerate with python -m grpc_tools.protoc -I protos --python_out=protos " \
            f"--grpc_python_out=protos --pyi_out=protos protos/goodspec/v1/generation.proto"


def test_proto_ships_inside_the_package():
    text = importlib.resources.files("goodspec.v1").joinpath("generation.proto").read_text()
    assert "service Generation" in text and "package goodspec.v1;" in text

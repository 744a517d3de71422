"""The committed gRPC stubs are exactly what `make proto` generates from proto/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GENERATED = ["meg_pb2.py", "meg_pb2.pyi", "meg_pb2_grpc.py"]


def test_stubs_are_current(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", str(REPO / "proto"), f"--python_out={tmp_path}",
                    f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", str(REPO / "proto/meg/v1/meg.proto")],
                   check=True)
    for name in GENERATED:
        fresh = (tmp_path / "meg/v1" / name).read_text()
        committed = (REPO / "proto/meg/v1" / name).read_text()
        assert fresh == committed, f"proto/meg/v1/{name} is stale: run `make proto` and commit"


def test_stub_check_detects_a_change(tmp_path: Path) -> None:
    """The comparison above can fail: a proto edit changes the generated module."""
    proto = (REPO / "proto/meg/v1/meg.proto").read_text().replace("bool reference = 10;", "bool reference = 10;\n  bool extra = 99;")
    (tmp_path / "src/meg/v1").mkdir(parents=True)
    (tmp_path / "src/meg/v1/meg.proto").write_text(proto)
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", str(tmp_path / "src"),
                    f"--python_out={tmp_path}", str(tmp_path / "src/meg/v1/meg.proto")], check=True)
    assert (tmp_path / "meg/v1/meg_pb2.py").read_text() != (REPO / "proto/meg/v1/meg_pb2.py").read_text()

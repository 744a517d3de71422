"""Rules of the code base that a reviewer would otherwise check by hand (issue 10)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SERVICES = ("edge_server", "channel_sim", "device_client")
PACKAGES = (*SERVICES, "codec", "wire", "serving", "telemetry", "models", "meg_cli", "bench", "security")
CHANNEL_NAMES = {"ideal", "awgn", "rayleigh", "rician", "gilbert-elliott"}
MAX_FUNCTION_LINES = 60


def _modules(packages: tuple[str, ...]) -> list[Path]:
    return sorted(p for pkg in packages for p in (REPO / pkg).rglob("*.py"))


@pytest.mark.parametrize("path", _modules(SERVICES), ids=lambda p: str(p.relative_to(REPO)))
def test_service_functions_are_short(path: Path) -> None:
    tree = ast.parse(path.read_text(), filename=str(path))
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines in {path.name}: {', '.join(long)}"


@pytest.mark.parametrize("path", _modules(PACKAGES), ids=lambda p: str(p.relative_to(REPO)))
def test_no_channel_name_is_compared_as_a_string(path: Path) -> None:
    """Channel models are told apart by their blocks (``noiseless``, ``fading``, params), never by name."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for operand in (node.left, *node.comparators):
                if isinstance(operand, ast.Constant) and operand.value in CHANNEL_NAMES:
                    found.append(f"line {node.lineno}: {operand.value!r}")
    assert not found, f"{path.name} compares channel names as strings: {', '.join(found)}"


def test_channel_emulator_imports_no_codec() -> None:
    """The emulator carries payloads without decoding them, so it must not load CompressAI."""
    for path in _modules(("channel_sim", "radio", "wire", "serving")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            bad = [n for n in names if n == "codec" or n.startswith("codec.") or n.startswith("compressai")]
            assert not bad, f"{path.relative_to(REPO)} imports {bad}"


def test_edge_and_device_meet_only_on_the_wire() -> None:
    for side, other in (("edge_server", "device_client"), ("device_client", "edge_server"),
                        ("codec", "edge_server"), ("codec", "device_client"), ("codec", "channel_sim")):
        for path in _modules((side,)):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                assert not any(n == other or n.startswith(other + ".") for n in names), \
                    f"{path.relative_to(REPO)} imports {other}"

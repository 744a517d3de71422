"""The README's shell examples, run against a live testbed, so the README cannot drift from the system.

Every ```bash block that talks to the device (``127.0.0.1:8000`` or ``meg generate``) must carry an
expectation comment right above it, e.g. ``<!-- readme-test: concealed=false psnr_db>20 -->``; it is run with
the device URL replaced by the test testbed's, and its answer (curl's JSON, or ``meg generate``'s summary)
must meet every expectation.
"""

from __future__ import annotations

import json
import operator
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO, Testbed

README = REPO / "README.md"
DEVICE = "http://127.0.0.1:8000"
BLOCK = re.compile(r"(?:<!--\s*readme-test:(?P<expect>[^\n]*?)-->\s*\n)?```bash\n(?P<code>.*?)```", re.S)
EXPECTATION = re.compile(r"^(?P<key>[a-z_]+)(?P<op>=|<|>)(?P<value>\S+)$")
OPS = {"=": operator.eq, "<": operator.lt, ">": operator.gt}


@dataclass(frozen=True)
class Example:
    line: int
    code: str
    expect: tuple[str, ...]

    def __str__(self) -> str:
        return f"README.md:{self.line}"


def examples() -> list[Example]:
    text = README.read_text(encoding="utf-8")
    found = []
    for m in BLOCK.finditer(text):
        code = m.group("code")
        if DEVICE not in code and "meg generate" not in code:
            continue  # set-up commands (make, docker compose): not run here
        found.append(Example(text.count("\n", 0, m.start("code")), code,
                             tuple((m.group("expect") or "").split())))
    return found


def test_every_device_example_states_what_it_shows() -> None:
    found = examples()
    assert len(found) >= 3, "the README's first requests are gone"
    for example in found:
        assert example.expect, f"{example}: add <!-- readme-test: ... --> above the example"
        for item in example.expect:
            assert EXPECTATION.match(item), f"{example}: cannot read the expectation {item!r}"
    first = found[0]
    assert "concealed=false" in first.expect, "the first example must show the system working"
    assert any("concealed=true" in e.expect for e in found), "an example must show the cliff and concealment"


def observed(stdout: str) -> dict[str, Any]:
    """``concealed`` and the quality numbers from curl's JSON or from `meg generate`'s summary."""
    try:
        out = json.loads(stdout)
    except ValueError:
        values: dict[str, Any] = {"concealed": "concealed" in stdout}
        for key, number in re.findall(r"\b(psnr_db|ms_ssim) (-?[0-9.]+|inf)", stdout):
            values[key] = float(number)
        return values
    assert isinstance(out, dict) and "concealed" in out, stdout[:2000]
    return {"concealed": out["concealed"], **out.get("quality", {}), "bits_sent": out["bits_sent"]}


def check(example: Example, values: dict[str, Any]) -> None:
    for item in example.expect:
        m = EXPECTATION.match(item)
        assert m, item
        key, op, raw = m.group("key"), m.group("op"), m.group("value")
        assert key in values, f"{example}: the answer has no {key}: {values}"
        expected: Any = {"true": True, "false": False}.get(raw, None)
        if expected is None:
            expected = float(raw)
        assert OPS[op](values[key], expected), f"{example}: expected {item}, got {key}={values[key]}"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("example", examples(), ids=str)
def test_readme_example(example: Example, testbed: Testbed, tmp_path: Path) -> None:
    assert example.expect, f"{example}: no expectation to check"
    assert shutil.which("curl"), "curl is needed (make test installs it: .ci/test-packages.txt)"
    code = example.code.replace(DEVICE, testbed.url)
    code = code.replace(".venv/bin/meg ", f"{sys.executable} -m meg_cli.main ")
    env = {**os.environ, "MEG_URL": testbed.url, "PYTHONPATH": os.pathsep.join(
        [str(REPO), str(REPO / "proto"), os.environ.get("PYTHONPATH", "")])}
    env.pop("MEG_API_KEY", None)
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"{example} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    check(example, observed(proc.stdout))
    for name in re.findall(r"-o (\S+\.png)", example.code):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name

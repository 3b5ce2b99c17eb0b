"""The repository keeps its promises: CI runs the README's command; layers import downwards."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["ir", "passes", "codegen", "backends", "autotune"]


def readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_ci_runs_the_readme_test_command():
    test_command = readme_commands()[1]
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert test_command in ci, "the README's test command and .ci/run have drifted apart"


def test_quickstart_is_two_commands_that_install_cpu_torch_first():
    cmds = readme_commands()[:2]
    assert len(cmds) == 2 and cmds[1] == "bash scripts/test.sh"
    script = (ROOT / "scripts" / "test.sh").read_text()
    for text in (cmds[0], script):
        assert text.index("torch==2.13.0") < text.index("-e ")


def test_lower_layers_never_import_higher_ones():
    for i, layer in enumerate(LAYERS):
        higher = set(LAYERS[i + 1:]) | {"cli", "api"}
        for path in (ROOT / layer).rglob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                for name in names:
                    parts = name.split(".")
                    if parts[0] == "kascade" and len(parts) > 1:
                        assert parts[1] not in higher, f"{path.relative_to(ROOT)} imports {name}"

"""The package reads top to bottom (issue 16): no function longer than 80 lines unless a
comment just above its ``def`` says why (``# Long on purpose: ...``)."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "mam2_fast"
LIMIT = 80


def long_functions():
    for path in sorted(PKG.rglob("*.py")):
        text = path.read_text()
        lines = text.splitlines()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > LIMIT:
                    first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                    above = "\n".join(lines[max(0, first - 4):first - 1])
                    yield path.relative_to(PKG.parent), node.name, n, "long on purpose" in above.lower()


def test_no_unexplained_long_function():
    bad = [f"{p}:{name} ({n} lines)" for p, name, n, explained in long_functions() if not explained]
    assert not bad, f"functions over {LIMIT} lines without a '# Long on purpose: <why>' comment above the def: {bad}"


def test_the_check_sees_long_functions(tmp_path):
    """The scan finds a long function (the test can fail)."""
    found = list(long_functions())
    assert all(n > LIMIT for _, _, n, _ in found)
    src = "def f():\n" + "    x = 1\n" * (LIMIT + 1)
    node = ast.parse(src).body[0]
    assert node.end_lineno - node.lineno + 1 > LIMIT

"""docs/troubleshooting.md (with the row-level table of docs/data.md) lists every message the library raises or
warns with. Messages are read from the source with ``ast``: each raise/warning whose first argument is a string
or f-string contributes its longest literal piece, which must appear in the docs."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("docs/troubleshooting.md", "docs/data.md")
MIN_PIECE = 12  # shorter pieces ("got {}") say nothing on their own
# internal errors users cannot reach through the public API
SKIP = {"has no attribute"}


def _literal_pieces(node: ast.AST) -> list[str] | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        out, current = [], ""
        for value in node.values:
            if isinstance(value, ast.Constant):
                current += value.value
            else:
                out.append(current)
                current = ""
        return [*out, current]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _literal_pieces(node.left), _literal_pieces(node.right)
        if left is None or right is None:
            return None
        return [*left[:-1], left[-1] + right[0], *right[1:]]
    return None


def messages() -> list[tuple[str, int, str]]:
    """(file, line, longest literal piece) of every raise and warning in the package."""
    found = []
    for path in sorted((ROOT / "hfrlhf").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                call = node.exc
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in (
                    "warn", "warning"):
                call = node
            else:
                continue
            pieces = _literal_pieces(call.args[0]) if call.args else None
            if not pieces:
                continue
            # %-style logging arguments split pieces too
            pieces = [p for piece in pieces for p in re.split(r"%[sdr]|%\(\w+\)[sdr]", piece)]
            piece = max((p.strip(" :;,.()") for p in pieces), key=len)
            if len(piece) >= MIN_PIECE and not any(s in piece for s in SKIP):
                found.append((str(path.relative_to(ROOT)), node.lineno, piece))
    return found


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("`", "").replace("\\|", "|"))


def test_the_scan_finds_the_messages_it_should():
    found = {piece for _, _, piece in messages()}
    assert len(found) > 100
    assert any(p.startswith("the tokenizer has neither a pad token nor an EOS token") for p in found)
    assert any("the loss was finite): check the learning rate" in p for p in found)
    assert any("leaves no room for a completion within max_length=" in p for p in found)


@pytest.mark.parametrize("path,line,piece", messages(), ids=lambda v: v if isinstance(v, str) else str(v))
def test_every_message_is_documented(path, line, piece):
    docs = _normalise("\n".join((ROOT / d).read_text() for d in DOCS))
    assert _normalise(piece) in docs, f"{path}:{line}: message not in {DOCS}: {piece!r}"

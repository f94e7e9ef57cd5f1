"""The rooms of minqwen/ hold: the network (minqwen/network/) imports only itself, the kernels and the
errors, so that it reads on its own; the kernels import no part of minqwen at all; and no inner room
imports an outer one (formats, text and serving sit around the network, the CLI around everything)."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "minqwen"

# room -> the minqwen modules (dotted, under minqwen) its files may import
ALLOWED = {
    "network": ("network", "kernels", "errors"),
    "text": ("text", "kernels", "errors", "formats.gguf"),  # the tokenizer reads a GGUF's vocabulary
    "formats": ("formats", "network", "text", "kernels", "errors"),
    "serve": ("serve", "text", "network", "model", "kernels", "errors"),
}


def minqwen_imports(path: Path, package: str) -> list[str]:
    """The minqwen modules a file imports, as dotted names under minqwen ("network.config", "kernels")."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                names.append(".".join([*base, *(node.module.split(".") if node.module else [])]))
            elif node.module and node.module.split(".")[0] in ("minqwen", "kernels"):
                names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names if a.name.split(".")[0] in ("minqwen", "kernels")]
    return [name.removeprefix("minqwen").lstrip(".") or "minqwen" for name in names]


def room_files(room: str) -> list[Path]:
    return sorted((PACKAGE / room).glob("*.py"))


@pytest.mark.parametrize("room", ALLOWED)
def test_each_room_imports_only_what_it_may(room):
    files = room_files(room)
    assert files, f"minqwen/{room}/ has no files"
    wrong = [f"{path.relative_to(ROOT)} imports minqwen.{name}"
             for path in files for name in minqwen_imports(path, f"minqwen.{room}")
             if not any(name == allowed or name.startswith(allowed + ".") for allowed in ALLOWED[room])]
    assert not wrong, "\n".join(wrong)


def test_the_kernels_import_no_part_of_minqwen():
    wrong = [f"{path.relative_to(ROOT)} imports {name}" for path in sorted((ROOT / "kernels").glob("*.py"))
             for name in minqwen_imports(path, "minqwen.kernels") if not name.startswith("kernels")]
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_a_forbidden_import(tmp_path):
    """The checks above are not vacuous: a network file importing the text room is caught."""
    bad = tmp_path / "decoder.py"
    bad.write_text("from ..text.generation import Sampler\nfrom .config import Config\n")
    assert minqwen_imports(bad, "minqwen.network") == ["text.generation", "network.config"]


def test_no_folder_of_the_repo_stands_in_for_the_kernels_package():
    """transformers imports the Hugging Face `kernels` package whenever a module of that name can be
    found: neither the tests' import path (conftest keeps the repo root off it) nor a bench script's
    (its own folder) may offer the repo's kernels/ folder or a bench/kernels.py under that name."""
    import importlib.util

    found = importlib.util.find_spec("kernels")
    assert found is None or ROOT not in Path(found.origin or "").resolve().parents, found
    from importlib.machinery import PathFinder
    for folder in (ROOT / "bench", ROOT / "tests"):
        assert PathFinder.find_spec("kernels", [str(folder)]) is None, folder

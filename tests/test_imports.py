"""The import graph: the entry point (`sskt_lightning.train`) imports the package, nothing in the
package imports it (no circle through it: what lower modules need lives in `compose`, the data
module, ...). Every import statement of every module counts, also those inside functions."""
import ast
from pathlib import Path

import pytest

import sskt_lightning

PACKAGE = Path(sskt_lightning.__file__).parent
ENTRY_POINT = "sskt_lightning.train"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every module the file imports; ``from a import b`` counts as ``a`` and
    ``a.b`` (b may be a submodule); relative imports are resolved against the file's package."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if _module_name(p) != ENTRY_POINT)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_nothing_imports_the_entry_point(path):
    bad = [f"line {line}: {mod}" for line, mod in imported_modules(path)
           if mod == ENTRY_POINT or mod.startswith(ENTRY_POINT + ".")]
    assert not bad, (f"{path} imports the entry point {ENTRY_POINT} ({bad}): take the name from where it "
                     "belongs (sskt_lightning.compose for CONFIG_DIR, sskt_lightning.data for data_info_of)")


def test_the_parser_sees_every_kind_of_import(tmp_path):
    """The check above would catch each way of spelling the import."""
    pkg = tmp_path / "sskt_lightning"
    (pkg / "cache").mkdir(parents=True)
    spellings = ["import sskt_lightning.train", "from sskt_lightning.train import run",
                 "from sskt_lightning import train", "def f():\n    from .. import train",
                 "from ..train import data_info_of"]
    global PACKAGE
    old, PACKAGE = PACKAGE, pkg
    try:
        for i, text in enumerate(spellings):
            path = pkg / "cache" / f"m{i}.py"
            path.write_text(text + "\n")
            assert ENTRY_POINT in [m for _, m in imported_modules(path)], text
        (pkg / "cache" / "ok.py").write_text("from sskt_lightning.training import x\nimport sskt_lightning.trainer\n")
        assert ENTRY_POINT not in [m for _, m in imported_modules(pkg / "cache" / "ok.py")]
    finally:
        PACKAGE = old


def test_sources_found():
    names = {_module_name(p) for p in SOURCES}
    assert {"sskt_lightning.validate", "sskt_lightning.options", "sskt_lightning.cache.__main__",
            "sskt_lightning.data.datamodule"} <= names


REPORT_LAYERS = ["common", "loading", "statistics", "tables", "figures", "cli"]


@pytest.mark.parametrize("part", REPORT_LAYERS)
def test_report_parts_import_only_the_parts_before_them(part):
    """sskt_lightning.report's rooms are layered (no circle inside the package either)."""
    path = PACKAGE / "report" / f"{part}.py"
    used = {m.split(".")[2] for _, m in imported_modules(path) if m.startswith("sskt_lightning.report.")}
    later = used - set(REPORT_LAYERS[: REPORT_LAYERS.index(part)])
    assert not later, f"report/{part}.py imports report parts {sorted(later)}, which do not come before it"
    assert {p.stem for p in (PACKAGE / "report").glob("*.py")} == {*REPORT_LAYERS, "__init__", "__main__"}


def test_the_entry_point_is_built_from_small_helpers():
    """train._run reads as the steps of a run (as lightning-hydra-template's train()), each built by
    a helper: no function of the entry point grows back into a 126-line room of a dozen jobs."""
    tree = ast.parse((PACKAGE / "train.py").read_text())
    sizes = {n.name: n.end_lineno - n.lineno + 1 for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    assert sizes["_run"] <= 40 and max(sizes.values()) <= 60, sizes
    run_body = ast.unparse(next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_run"))
    for helper in ("start_run", "build_data", "build_module", "build_callbacks", "build_loggers", "build_trainer",
                   "fit_and_test", "build_results", "publish_results"):
        assert f"{helper}(" in run_body, helper

"""The harness is the package `compress.evaluate` (the folder evaluate/, linked from compress/), never
the top-level name `evaluate`: that name is Hugging Face's evaluate package, which lm-eval installs
and imports (`evaluate.load`). A top-level `evaluate` of ours shadowed it when run from the
repository, was shadowed by it elsewhere, and a wheel of ours wrote files into its folder."""
from __future__ import annotations

import ast
import re
import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import compress.evaluate.bench

ROOT = Path(__file__).resolve().parents[1]


def top_level_evaluate_imports(path: Path) -> list[str]:
    """`import evaluate...` / `from evaluate... import` statements in one Python file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        found += [f"{path.relative_to(ROOT)}:{node.lineno}: {name}" for name in names
                  if name.split(".")[0] == "evaluate"]
    return found


def test_no_code_imports_the_top_level_name_evaluate():
    files = [p for folder in ("compress", "evaluate", "tests", "scripts")
             for p in (ROOT / folder).rglob("*.py") if "compress/evaluate" not in p.as_posix()]
    assert len(files) > 50
    assert [hit for p in files for hit in top_level_evaluate_imports(p)] == []
    scripts = "".join(p.read_text() for p in (ROOT / "scripts").glob("*.sh"))
    assert "-m evaluate." not in scripts and "-m compress.evaluate.kernel_bench" in scripts


def test_the_harness_folder_is_compress_evaluate_and_shadows_nothing():
    assert Path(compress.evaluate.bench.__file__).resolve() == ROOT / "evaluate" / "bench.py"
    # No __init__.py: from the repository root (on sys.path under `python -m`), `import evaluate`
    # finds at most a namespace portion here, so any installed regular package of that name wins.
    assert not (ROOT / "evaluate" / "__init__.py").exists()
    code = "import importlib.util as u; s = u.find_spec('evaluate'); print(s.origin if s else '')"
    origin = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.strip()
    if importlib.util.find_spec("lm_eval") is not None and origin not in ("", "None"):
        assert not Path(origin).resolve().is_relative_to(ROOT / "evaluate")


def test_the_wheel_holds_compress_evaluate_and_no_top_level_evaluate(tmp_path):
    setuptools = pytest.importorskip("setuptools")
    if tuple(map(int, setuptools.__version__.split(".")[:2])) < (70, 1) \
            and importlib.util.find_spec("wheel") is None:
        pytest.skip("setuptools < 70.1 builds wheels only with the wheel package installed")
    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info beside the code
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for folder in ("compress", "evaluate"):
        shutil.copytree(ROOT / folder, source / folder, symlinks=True, ignore=ignore)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", "-w", str(tmp_path / "dist"), str(source)], check=True,
                   capture_output=True)
    wheel, = (tmp_path / "dist").glob("compress-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "compress/evaluate/bench.py" in names and "compress/evaluate/engine.py" in names
    assert not [n for n in names if n.startswith("evaluate/")]


def test_every_third_party_package_the_code_imports_is_declared():
    """A package imported by compress/ or evaluate/ must be in pyproject's dependencies (or the
    test extra), not only present because another dependency happens to pull it in."""
    import importlib.metadata

    tomllib = pytest.importorskip("tomllib")   # Python 3.11+

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + [s for extra in project["optional-dependencies"].values()
                                       for s in extra]
    declared = {_normalized(re.match(r"[A-Za-z0-9_.-]+", spec).group()) for spec in specs}
    distributions = importlib.metadata.packages_distributions()
    missing = set()
    for folder in ("compress", "evaluate"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for top in {name.split(".")[0] for name in names}:
                    if top in sys.stdlib_module_names or top in ("compress", "evaluate"):
                        continue
                    owners = {_normalized(d) for d in distributions.get(top, [top])}
                    if not owners & declared:
                        missing.add(f"{top} ({path.relative_to(ROOT)})")
    assert not missing, sorted(missing)


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()

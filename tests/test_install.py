"""The package as a user installs it: the wheel ships every config and the console scripts, the
declared dependencies cover every import, and the wheel, installed into a fresh virtual environment
(no system site-packages, no PYTHONPATH), composes the canonical call and runs a smoke job, an
evaluation and a report from a directory outside the checkout. An editable install of the same
tree resolves the same configs.

The fresh environment is ``.venv-wheelcheck/`` in the checkout: created (about 1.5 min: torch and
its CUDA libraries come from this machine's disk) when it is missing or the wheel's declared
dependencies changed, otherwise reused with only the freshly built wheel reinstalled and
``pip check`` run. CI works on a fresh clone, so there it is always new.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from sskt_lightning.compose import compose_config

tomllib = pytest.importorskip("tomllib")   # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-wheelcheck"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
CANONICAL = ["model=resnet18", "data=cifar10", "method=sskt"]
SCRIPTS = {"sskt-train": "sskt_lightning.train:main", "sskt-eval": "sskt_lightning.eval:main",
           "sskt-report": "sskt_lightning.report:main", "sskt-cache": "sskt_lightning.cache.__main__:main",
           "sskt-rank": "sskt_lightning.rank:main"}
# top-level entries not copied into the build tree: version control, environments, build and run outputs
_NOT_SOURCE = {".git", ".venv", ".venv-wheelcheck", ".venv-sweeper", "build", "dist", "outputs", "multirun", "data", "runs",
               "wandb", "lightning_logs", "experiments", ".pytest_cache"}


def _dist(requirement: str) -> str:
    name = requirement.split(";")[0]
    for sep in "<>=!~[ ":
        name = name.split(sep)[0]
    return name.lower().replace("_", "-")


def _imports(folder: Path) -> dict[str, set[str]]:
    """Top-level names of the absolute imports in every .py under ``folder`` -> the files."""
    found: dict[str, set[str]] = {}
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(path.name)
    return found


def _undeclared(folder: Path, declared: set[str]) -> dict[str, set[str]]:
    dists = packages_distributions()
    # the project and the folder's own modules (tests import helpers from each other)
    own = {"sskt_lightning", "two_stage"} | {p.stem for p in folder.rglob("*.py")}
    missing = {}
    for name, files in _imports(folder).items():
        if name in sys.stdlib_module_names or name in own:
            continue
        provided = {d.lower().replace("_", "-") for d in dists.get(name, [name])}
        if not provided & declared:
            missing[name] = files
    return missing


def test_every_import_in_the_package_is_a_declared_dependency():
    # plus the [sweep] extra: optuna and the sweeper's parser are imported only inside the protocol
    # command's search, which names the extra when they are missing
    core = {_dist(r) for r in [*PYPROJECT["project"]["dependencies"],
                               *PYPROJECT["project"]["optional-dependencies"]["sweep"]]}
    assert _undeclared(ROOT / "src", core) == {}, "declare these in [project] dependencies"


def test_every_import_in_the_tests_is_declared_for_make_test():
    extras = PYPROJECT["project"]["optional-dependencies"]
    declared = {_dist(r) for r in [*PYPROJECT["project"]["dependencies"], *extras["dev"], *extras["wandb"],
                                    *extras["sweep"], *extras["bench"]]}
    assert _undeclared(ROOT / "tests", declared) == {}
    make = (ROOT / "Makefile").read_text()
    assert "'.[dev,wandb,sweep,bench]'" in make   # what `make test` installs
    # and, for the tests marked optuna_sweeper, the sweeper's own environment
    sweeper_tests = {_dist(r) for r in [*PYPROJECT["project"]["dependencies"], *extras["dev"],
                                        *extras["optuna-sweeper"]]}
    assert _undeclared(ROOT / "tests", sweeper_tests | declared) == {}
    assert "'.[dev,optuna-sweeper]'" in make and '-m optuna_sweeper' in make and '-m "not optuna_sweeper"' in make


def test_the_protocols_optuna_and_the_sweepers_optuna_live_in_separate_extras():
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert [r for r in extras["sweep"] if _dist(r) == "optuna"] == ["optuna>=4.0,<5"]
    assert not any(_dist(r) == "hydra-optuna-sweeper" for r in extras["sweep"])
    assert {_dist(r) for r in extras["optuna-sweeper"]} == {"hydra-optuna-sweeper", "optuna"}


def test_console_scripts_point_at_functions_that_exist():
    assert PYPROJECT["project"]["scripts"] == SCRIPTS
    import importlib
    for target in SCRIPTS.values():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), target


def _build_wheel(tmp: Path) -> Path:
    """``pip wheel`` of a copy of the checkout (a clean build/ every time: a stale one would ship
    files that are gone from the tree)."""
    src = tmp / "checkout"
    def ignore(folder, names):
        return [n for n in names if (Path(folder) == ROOT and n in _NOT_SOURCE) or n == "__pycache__"
                or n.endswith((".egg-info", ".pyc"))]
    shutil.copytree(ROOT, src, ignore=ignore)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp / "dist"), str(src)],
                   check=True, capture_output=True, text=True, timeout=600)
    (wheel,) = (tmp / "dist").glob("sskt_lightning-*.whl")
    return wheel


def _fresh_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PYTHONNOUSERSITE="1", OMP_NUM_THREADS="1", WANDB_MODE="disabled",
               PATH=f"{VENV / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    return env


def _venv_with(wheel: Path) -> Path:
    """``VENV`` with ``wheel`` and exactly what it declares (see the module docstring)."""
    with zipfile.ZipFile(wheel) as zf:
        meta = zf.read(next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    requires = sorted(line for line in meta.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line)
    key = hashlib.sha256("\n".join([sys.version, *requires]).encode()).hexdigest()
    python, stamp = VENV / "bin" / "python", VENV / ".deps-key"
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    if stamp.is_file() and stamp.read_text() == key and python.exists():
        subprocess.run([*pip, "--no-deps", "--force-reinstall", str(wheel)], check=True, timeout=600)
    else:
        shutil.rmtree(VENV, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True, timeout=600)
        subprocess.run([*pip, str(wheel)], check=True, timeout=1800, env=_fresh_env())
        stamp.write_text(key)
    assert "include-system-site-packages = false" in (VENV / "pyvenv.cfg").read_text()
    check = subprocess.run([str(python), "-m", "pip", "check"], capture_output=True, text=True, env=_fresh_env())
    assert check.returncode == 0, check.stdout + check.stderr
    return python


# Run in the installed environment: where the configs come from, and the canonical call composed
# both through Hydra's package source (pkg://sskt_lightning.conf) and the directory CONFIG_DIR.
_PROBE = """
import json, sys, importlib.resources as r
from hydra import compose, initialize_config_dir, initialize_config_module
from omegaconf import OmegaConf
import sskt_lightning, sskt_lightning.compose as c
over = sys.argv[1:] + ["paths.output_dir=/out"]
with initialize_config_module("sskt_lightning.conf", version_base="1.3"):
    pkg = OmegaConf.to_container(compose("train", overrides=over))
with initialize_config_dir(config_dir=c.CONFIG_DIR, version_base="1.3"):
    by_dir = OmegaConf.to_container(compose("train", overrides=over))
print(json.dumps({"package": sskt_lightning.__file__, "config_dir": c.CONFIG_DIR,
                  "resources": str(r.files("sskt_lightning.conf")), "pkg": pkg, "dir": by_dir}))
"""


def _run(args: list, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=_fresh_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{args[:3]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.install
def test_wheel_in_a_fresh_venv_composes_trains_evaluates_and_reports(tmp_path):
    from data_fixtures import write_cifar10
    wheel = _build_wheel(tmp_path)

    # the wheel holds every yaml of conf/ (subfolders and `# @package` files included) and the scripts
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = zf.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    yamls = {f"sskt_lightning/conf/{p.relative_to(ROOT / 'conf').as_posix()}" for p in (ROOT / "conf").rglob("*.yaml")}
    assert yamls and yamls <= names, sorted(yamls - names)
    assert "sskt_lightning/conf/experiment/paper/cifar10_resnet20.yaml" in names
    for script, target in SCRIPTS.items():
        assert f"{script} = {target}" in entry_points

    python = _venv_with(wheel)
    outside = tmp_path / "elsewhere"   # not the checkout: nothing there to find configs in
    outside.mkdir()
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], outside).stdout.strip())

    # the canonical call, as the user types it
    job = _run([python, "-m", "sskt_lightning.train", "--cfg", "job", *CANONICAL], outside).stdout
    job = OmegaConf.to_container(OmegaConf.create(job))
    assert job["model"]["name"] == "resnet18" and job["data"]["name"] == "cifar10" and job["method"]["name"] == "sskt"
    here = OmegaConf.to_container(compose_config(CANONICAL, tmp_path / "x"))   # this checkout, in-process
    assert {k: v for k, v in job.items() if k != "paths"} == {k: v for k, v in here.items() if k != "paths"}

    # configs from inside site-packages, the same through pkg:// and through the directory
    probe = json.loads(_run([python, "-c", _PROBE, *CANONICAL], outside).stdout)
    assert Path(probe["package"]).parent == site / "sskt_lightning"
    assert Path(probe["config_dir"]) == Path(probe["resources"]) == site / "sskt_lightning" / "conf"
    assert probe["pkg"] == probe["dir"] and probe["pkg"]["method"]["name"] == "sskt"

    # a smoke job through the console script, then its checkpoint evaluated and the run reported
    data_dir = tmp_path / "data"
    write_cifar10(data_dir, n_train=80, n_test=24)
    run_dir = tmp_path / "run"
    _run([VENV / "bin" / "sskt-train", "method=scratch", "trainer=smoke", "model=resnet20", "data=cifar10",
          f"paths.data_dir={data_dir}", "data.val_size=16", "data.batch_size=8", "data.num_workers=0",
          f"hydra.run.dir={run_dir}"], outside)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["method"] == "scratch" and (run_dir / "checkpoints" / "last.ckpt").is_file()
    _run([VENV / "bin" / "sskt-eval", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", "trainer=smoke",
          f"hydra.run.dir={tmp_path / 'eval'}"], outside)
    evaluated = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert evaluated["acc"] == pytest.approx(results["test_acc"], abs=1e-6)
    _run([VENV / "bin" / "sskt-report", run_dir, "--out", tmp_path / "report"], outside)
    assert (tmp_path / "report" / "report.md").is_file()

    # the editable install of the same tree resolves the same configs from the checkout's conf/
    _run([python, "-m", "pip", "install", "-q", "--no-deps", "-e", tmp_path / "checkout"], outside)
    editable = json.loads(_run([python, "-c", _PROBE, *CANONICAL], outside).stdout)
    assert Path(editable["package"]).parent == tmp_path / "checkout" / "src" / "sskt_lightning"
    assert Path(editable["config_dir"]) == Path(editable["resources"]) == tmp_path / "checkout" / "conf"
    assert editable["pkg"] == editable["dir"] == probe["pkg"]


def _readme_example() -> str:
    """The code block of the 'Use the module in your own Lightning script' section of docs/python-api.md
    (the README's reference moved into docs/)."""
    text = (ROOT / "docs" / "python-api.md").read_text().split("## Use the module in your own Lightning script", 1)[1]
    text = text.split("\n## ", 1)[0]
    lines = text.splitlines()
    start = lines.index("```python") + 1
    return "\n".join(lines[start:lines.index("```", start)])


def test_readme_library_example_runs(tmp_path, monkeypatch):
    """The documented code (docs/python-api.md), made tiny and offline by replacing a few literals (each must be there)."""
    from data_fixtures import write_cifar10
    code = _readme_example()
    for old, new in [
        ('SourceOptions("imagenet_resnet18")',   # random source weights: no hub here
         'SourceOptions("imagenet_resnet18", pretrained=False, input_size=32)'),
        ("batch_size=128, val_size=5000", "batch_size=8, val_size=16, num_workers=0"),
        ('max_epochs=10, accelerator="auto"', 'max_epochs=1, accelerator="cpu", limit_train_batches=2, '
         'limit_val_batches=2, limit_test_batches=2'),
    ]:
        assert old in code, f"docs/python-api.md example changed: {old!r} not found"
        code = code.replace(old, new)
    write_cifar10(tmp_path / "data", n_train=80, n_test=24)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    with pytest.warns(UserWarning, match="RANDOM weights"):
        exec(compile(code, "docs/python-api.md", "exec"), namespace)
    tested = namespace["trainer"].callback_metrics
    assert 0.0 <= float(tested["test/acc"]) <= 1.0
    assert list((tmp_path / "lightning_logs").rglob("last.ckpt"))
    module = namespace["module"]
    assert module.method.name == "sskt" and len(module.sources) == 1
    assert (module.method.alpha, module.method.temperature) == (0.5, 2.0)
    assert module.hparams["config"]["data"]["batch_size"] == 8   # sskt-eval finds the data

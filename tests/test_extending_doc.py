"""docs/extending.md's claim, run: a new method is one file in sskt_lightning/methods/ plus one
yaml. The example's two blocks are copied out of the page into a temporary directory (the Python
file joins the sskt_lightning.methods package there, the yaml is found through hydra.searchpath),
no other file is touched, and the method contract of tests/method_contract.py runs on it."""
import re
import sys
from pathlib import Path

import pytest

import sskt_lightning.methods as methods_pkg
from sskt_lightning.errors import ConfigError
from sskt_lightning.methods import Method

from method_contract import check_bad_values_are_refused, check_config_is_the_constructor, check_trains_and_checkpoints

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"
BLOCK = re.compile(r"<!-- extending-example: (\S+) -->\n```(\w+)\n(.*?)```", re.S)


def example_blocks() -> dict[str, str]:
    """``{relative path: text}`` of the example's blocks, in the page's order."""
    return {path: text for path, _, text in BLOCK.findall(DOC.read_text())}


@pytest.fixture
def example_method(tmp_path, monkeypatch):
    """The page's method installed the way a newcomer would, but in tmp_path: its file as a module
    of sskt_lightning.methods, its yaml in a config directory on Hydra's search path."""
    blocks = example_blocks()
    assert set(blocks) == {"methods/label_smoothing.py", "method/label_smoothing.yaml"}, list(blocks)
    code_dir, conf_dir = tmp_path / "methods", tmp_path / "conf"
    for path, text in blocks.items():
        dest = (code_dir / Path(path).name) if path.startswith("methods/") else (conf_dir / path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(text)
    monkeypatch.setattr(methods_pkg, "__path__", [*methods_pkg.__path__, str(code_dir)])
    monkeypatch.setattr(Method, "registry", dict(Method.registry))      # leave the registry as found
    yield "label_smoothing", [f"hydra.searchpath=[file://{conf_dir}]"]
    sys.modules.pop("sskt_lightning.methods.label_smoothing", None)
    import sskt_lightning.options as options
    options.__dict__.pop("LabelSmoothingOptions", None)
    options._MADE.pop(next((c for c in options._MADE if c.__name__ == "LabelSmoothing"), None), None)


def test_the_example_is_one_file_and_one_yaml_in_the_package_layout():
    blocks = example_blocks()
    assert list(blocks) == ["methods/label_smoothing.py", "method/label_smoothing.yaml"]
    root = Path(__file__).resolve().parents[1]
    assert not (root / "src" / "sskt_lightning" / "methods" / "label_smoothing.py").exists()   # not shipped
    assert not (root / "conf" / "method" / "label_smoothing.yaml").exists()


def test_the_example_config_is_its_constructor(example_method):
    name, extra = example_method
    check_config_is_the_constructor(name, extra)
    from sskt_lightning.options import LabelSmoothingOptions, method_options
    assert LabelSmoothingOptions is method_options(Method.registry[name])
    assert LabelSmoothingOptions().smoothing == 0.1 and LabelSmoothingOptions.config == name
    with pytest.raises(ConfigError, match=r"unknown option\(s\) 'smothing' \(did you mean 'smoothing'\?\)"):
        LabelSmoothingOptions(smothing=0.2)


def test_the_example_refuses_bad_values_before_reading_data(example_method, tmp_path):
    from sskt_lightning.compose import compose_config
    from sskt_lightning.train import run
    name, extra = example_method
    check_bad_values_are_refused(name, tmp_path / "generic", extra)
    with pytest.raises(ConfigError, match=r"method.smoothing=1.5: must lie in \[0.0, 1.0\]"):   # the page's words
        run(compose_config(["trainer=smoke", f"paths.data_dir={tmp_path / 'no_data_here'}", f"method={name}",
                            *extra, "method.smoothing=1.5"], tmp_path / "bad"))


@pytest.mark.slow
def test_the_example_trains_and_checkpoints(example_method, cifar_dir, tmp_path):
    name, extra = example_method
    results = check_trains_and_checkpoints(name, cifar_dir, tmp_path, extra)
    assert results["method_settings"] == {"smoothing": 0.1}

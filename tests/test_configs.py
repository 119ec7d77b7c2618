"""Every config file loads, in its default and its smoke form, and smoke is smaller."""

import importlib.util
import pathlib

import ml_collections
import pytest

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
CONFIG_FILES = sorted(p for p in CONFIG_DIR.glob("*.py") if p.name != "__init__.py")


def _load(path):
    spec = importlib.util.spec_from_file_location(f"cfg_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_there_are_configs():
    assert len(CONFIG_FILES) >= 1


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
@pytest.mark.parametrize("arg", [None, "smoke"])
def test_config_loads(path, arg):
    module = _load(path)
    assert module.__doc__, f"{path.name} needs a docstring (command, run time, expected result)"
    cfg = module.get_config(arg)
    assert isinstance(cfg, ml_collections.ConfigDict)
    # Configs must be serialisable: they are written next to every run.
    assert cfg.to_json()


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_unknown_arg_is_an_error(path):
    module = _load(path)
    with pytest.raises((ValueError, KeyError)):
        module.get_config("no_such_variant_xyz")

"""Where the default model's inputs come from (the package) and where it is built."""

from pathlib import Path

import pytest

from kiln.errors import InputError
from kiln.train import default_model


def test_the_demo_inputs_ship_inside_the_package():
    assert Path(default_model.PACKAGE_DATA).parts[-2:] == ("kiln", "data")
    assert default_model.DEFAULT_CONFIG.is_file()
    assert len(list(default_model.CORPUS.glob("*.txt"))) > 30
    assert default_model.SFT_DATA.is_file() and default_model.DPO_DATA.is_file()


def test_kiln_home_from_the_environment_else_the_checkout(monkeypatch, tmp_path):
    monkeypatch.setenv("KILN_HOME", str(tmp_path))
    assert default_model.default_dir() == tmp_path / "models" / "default"
    monkeypatch.delenv("KILN_HOME")
    assert (default_model.kiln_home() / "pyproject.toml").is_file()  # tests run from a checkout


def test_fine_tuning_without_a_model_asks_for_the_demo_build(tmp_path):
    with pytest.raises(InputError, match="kiln demo --no-serve"):
        default_model.built_chat_model(tmp_path)

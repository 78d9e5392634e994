"""The README: two set-up commands first, every Python block runs, every override composes."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from pl_mtt.training.app import config_dir, merge_loss_shorthand_overrides
from pl_mtt.training.schema import register_configs

README = Path(__file__).resolve().parent.parent / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.S | re.M)


def blocks(language: str) -> list[str]:
    return [code for lang, code in FENCE.findall(README.read_text()) if lang == language]


def test_opens_with_the_two_set_up_commands():
    first, second = FENCE.findall(README.read_text())[:2]
    assert first[0] == second[0] == "bash"
    assert first[1].strip().startswith("pip install torch==2.13.0 && ")
    assert first[1].strip().endswith("python -m pl_mtt.train")
    assert second[1].strip().startswith("pip install torch==2.13.0 && ")
    assert second[1].strip().endswith("python -m pytest")
    for _, command in (first, second):
        assert "git clone" not in command
        assert "cd " not in command


@pytest.mark.slow
def test_every_python_block_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PL_MTT_CACHE", str(tmp_path / "cache"))
    python_blocks = blocks("python")
    assert len(python_blocks) >= 2
    namespace: dict = {}
    for code in python_blocks:
        exec(compile(code, str(README), "exec"), namespace)
    assert namespace["task"].scaler is not None


def app_commands() -> list[list[str]]:
    commands = []
    for block in blocks("bash")[2:]:
        for line in block.splitlines():
            line = line.split("#", 1)[0].strip()
            words = shlex.split(line)
            if words[:3] == ["python", "-m", "pl_mtt.train"]:
                commands.append(words[3:])
    return commands


@pytest.mark.parametrize("arguments", app_commands(), ids=" ".join)
def test_every_override_example_composes(arguments, tmp_path):
    arguments = [a for a in arguments if a != "-m"]
    arguments = [a.replace("<run>", "run") for a in arguments]
    arguments = [a.split(",")[0] if a.startswith("loss.") else a for a in arguments]
    register_configs()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=merge_loss_shorthand_overrides(arguments))
    assert cfg.trainer is not None
    if "dry_run=true" in arguments:
        assert cfg.dry_run

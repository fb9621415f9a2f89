"""Every README command that runs without a GPU is run here, in order, as a new user would.

Commands come from the ```bash blocks (continuation lines joined); Python blocks run
as scripts. Skipped, and why: `make` (this suite is what `make test` runs), activating
the virtual environment (the test puts its bin folder on PATH), `trtq build` (needs
TensorRT and a GPU). Blocks without a language tag (GPU-only recipes) are not run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

README = REPO / "README.md"
SKIPPED = (
    re.compile(r"^make\b"),
    re.compile(r"^\. \.venv/bin/activate"),
    re.compile(r"^trtq build\b"),
)


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def bash_commands() -> list[str]:
    commands = []
    for block in blocks("bash"):
        for command in block.replace("\\\n", " ").splitlines():
            command = command.split(" #")[0].strip() if not command.lstrip().startswith("#") else ""
            if command and not any(p.search(command) for p in SKIPPED):
                commands.append(command)
    return commands


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A fresh folder with the sample data, like a clone after `make demo`."""
    folder = tmp_path_factory.mktemp("readme")
    shutil.copytree(REPO / "calib_data", folder / "calib_data")
    return folder


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def test_the_readme_has_commands_to_run():
    commands = bash_commands()
    assert any(c.startswith("trtq quantize") for c in commands)
    assert any(c.startswith("polygraphy run") for c in commands)


def test_every_cpu_command_of_the_readme_runs(workdir):
    for command in bash_commands():
        proc = subprocess.run(
            command, shell=True, cwd=workdir, env=environment(), capture_output=True, text=True
        )
        assert proc.returncode == 0, f"README command failed: {command}\n{proc.stderr[-2000:]}"
    for code in blocks("python"):
        proc = subprocess.run(
            [sys.executable, "-c", code],
            cwd=workdir,
            env=environment(),
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, f"README Python block failed:\n{code}\n{proc.stderr[-2000:]}"

"""The console scripts (tools/commands.py): each names a command that exists, and Ctrl-C while a command still
imports torch and the rest ends in one line and exit code 130, not in a traceback from inside an import."""

from __future__ import annotations

import ast
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tools import commands

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = (REPO / "pyproject.toml").read_text().split("[project.scripts]")[1].split("\n[")[0]


def test_every_console_script_is_a_named_command():
    scripts = dict(re.findall(r'^(\w+) = "([\w.:]+)"', SCRIPTS, re.M))
    assert scripts == {name: f"tools.commands:{name}" for name in commands.COMMANDS}
    for name, target in commands.COMMANDS.items():
        assert callable(getattr(commands, name)), name
        module, function = target.split(":")
        tree = ast.parse((REPO / (module.replace(".", "/") + ".py")).read_text())
        assert function in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}, target


def test_a_command_runs_its_main_with_the_process_arguments(tmp_path, monkeypatch, capsys):
    (tmp_path / "fake_command.py").write_text("import sys\ndef main():\n    print('ARGS', sys.argv[1:])\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(commands.COMMANDS, "fake", "fake_command:main")
    monkeypatch.setattr(sys, "argv", ["fake", "--n", "3"])
    commands.launch("fake")
    assert capsys.readouterr().out == "ARGS ['--n', '3']\n"


def test_ctrl_c_during_the_imports_is_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "slow_command.py").write_text("raise KeyboardInterrupt\n")  # as if Ctrl-C came mid-import
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(commands.COMMANDS, "slow", "slow_command:main")
    with pytest.raises(SystemExit) as stopped:
        commands.launch("slow")
    assert stopped.value.code == 130
    assert capsys.readouterr().err.strip() == "slow: interrupted (Ctrl-C)"


def test_a_real_ctrl_c_while_torch_imports():
    """A real SIGINT, sent as soon as the console-script function starts: `import torch` alone takes over a
    second, so the signal lands inside the command's imports."""
    code = ("import sys\nfrom tools import commands\nsys.argv = ['sample', '--help']\n"
            "print('ready', flush=True)\ncommands.sample()\n")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip() == "sample: interrupted (Ctrl-C)"
    assert "Traceback" not in err and "usage" not in out

"""The console scripts (tools/commands.py): each names a command that exists, and Ctrl-C while a command still
imports torch and the rest ends in one line and exit code 130, not in a traceback from inside an import."""

from __future__ import annotations

import ast
import os
import re
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


@pytest.mark.parametrize("signal_name, code, line", [("SIGINT", 130, "sample: interrupted (Ctrl-C)"),
                                                      ("SIGTERM", 143, "sample: stopped by SIGTERM")])  # fmt: skip
def test_a_real_signal_while_torch_imports_is_one_line(signal_name, code, line):
    """A real Ctrl-C (SIGINT) or SIGTERM (a scheduler, `timeout`) in a command's first seconds: a traceback from
    inside an import (exit -2), or a silent kill (exit -15), before; one line and the shell's exit code now. The
    process sends itself the signal when the command's imports reach torch (a finder at the head of the import
    path: a signal sent from outside could land before or after the imports)."""
    program = ("import os, signal, sys\n"
               "class Interrupt:\n"
               "    def find_spec(self, name, path=None, target=None):\n"
               "        if name == 'torch':\n"
               f"            os.kill(os.getpid(), signal.{signal_name})\n"
               "sys.meta_path.insert(0, Interrupt())\n"
               "from tools import commands\nsys.argv = ['sample', '--help']\ncommands.sample()\n")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == code, proc.stderr[-2000:]
    assert proc.stderr.strip() == line
    assert "Traceback" not in proc.stderr and "usage" not in proc.stdout

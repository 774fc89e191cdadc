"""The architecture, checked: imports flow one way (common <- stage1_vqvae <- stage2_prior <- tools), entry
points never import each other, network files import torch only, and no library code unpickles freely."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tools.commands import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["common", "stage1_vqvae", "stage2_prior", "tools"]  # each may import only the ones before it
# the console scripts all go through tools.commands, which names each command's own module: those are the entry points
ENTRY_POINTS = sorted({target.split(":")[0] for target in COMMANDS.values()})
TORCH_ONLY = ["stage1_vqvae/networks.py", "stage1_vqvae/quantizer.py", "stage2_prior/decoding.py",
              "stage2_prior/transformer.py", "stage2_prior/pixelcnn.py", "stage2_prior/sampling.py",
              "stage2_prior/maskgit.py", "stage2_prior/masked_sampling.py"]  # fmt: skip


def imports(path: Path) -> set[str]:
    """Every module a file imports (absolute names), at any depth of the file (lazy imports count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return found


def module_files(package: str) -> list[Path]:
    return sorted((ROOT / package).glob("*.py"))


@pytest.mark.parametrize("layer", LAYERS)
def test_imports_flow_one_way(layer):
    later = LAYERS[LAYERS.index(layer) + 1 :]
    for path in module_files(layer):
        bad = sorted(m for m in imports(path) if m.split(".")[0] in later)
        assert not bad, f"{path.relative_to(ROOT)} imports {bad} from a later layer"


def test_entry_points_are_leaves():
    assert len(ENTRY_POINTS) >= 8
    for entry in ENTRY_POINTS:
        path = ROOT / (entry.replace(".", "/") + ".py")
        others = sorted(m for m in imports(path) if any(m == e or m.startswith(e + ".") for e in ENTRY_POINTS))
        others = [m for m in others if not m.startswith(entry)]
        assert not others, f"entry point {entry} imports entry point(s) {others}"


def test_network_files_import_torch_only():
    allowed = {"torch", "math", "abc", "collections", "contextlib", "__future__", "stage2_prior", "stage1_vqvae",
               "dataclasses", "typing", "warnings"}  # fmt: skip
    for name in TORCH_ONLY:
        bad = sorted(m for m in imports(ROOT / name) if m.split(".")[0] not in allowed)
        assert not bad, f"{name} imports {bad}"
        assert not any(m.startswith(("stage1_vqvae.vqvae", "stage2_prior.prior")) for m in imports(ROOT / name))


def test_no_unrestricted_unpickling_in_library_code():
    for layer in LAYERS:
        for path in module_files(layer):
            text = path.read_text()
            assert "weights_only=False" not in text and "allow_pickle=True" not in text, path
            assert "pickle.load(" not in text, f"{path}: unpickle only through a restricted Unpickler"


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("stage*/*.yaml")), ids=lambda p: p.name)
def test_every_config_parses(config, capsys):
    """Every shipped YAML is valid for its command (LightningCLI checks keys and types with --print_config)."""
    if config.parent.name == "stage1":
        from stage1_vqvae.train import main
    else:
        from stage2_prior.train import main
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(config), "--print_config"])
    assert info.value.code in (0, None) and "model:" in capsys.readouterr().out

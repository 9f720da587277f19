"""Mistakes a person makes on the command line and in warmup() get one readable line, not a traceback."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import compiler
from compiler.cli import main


@pytest.mark.parametrize("argv,says", [
    (["inspect", "models.gpt"], "MODULE:FACTORY"),
    (["inspect", "models.no_such_module:tiny"], "cannot import module 'models.no_such_module'"),
    (["inspect", "models.gpt:no_such_factory"], "has no factory 'no_such_factory'"),
    (["inspect", "models.gpt:GPTConfig.tiny"], "has no factory"),
    (["warmup", "models.gpt:tiny_sdpa_gqa", "--shapes", "batch"], "key=value"),
    (["warmup", "models.gpt:tiny_sdpa_gqa", "--shapes", "=3"], "key=value"),
    (["warmup", "models.gpt:tiny_sdpa_gqa", "--shapes", "size=3"], "size"),
    (["cache", "import", "{tmp}/missing.zip"], "missing.zip"),
    (["cache", "import", "{tmp}/not-a-zip.zip"], "not a zip"),
    (["cache", "export", "{tmp}/no/such/folder/cache.zip"], "folder"),
])
def test_cli_mistakes_print_one_line_and_fail(tmp_path, capsys, argv, says):
    (tmp_path / "not-a-zip.zip").write_text("hello")
    status = main([arg.replace("{tmp}", str(tmp_path)) for arg in argv])
    out, err = capsys.readouterr()
    assert status != 0
    assert err.count("\n") == 1 and err.startswith("python -m compiler: error: ") and says in err
    assert "Traceback" not in err and ".partial" not in err


def test_cli_error_exit_status_from_a_shell(tmp_path):
    result = subprocess.run([sys.executable, "-m", "compiler", "cache", "import", str(tmp_path / "missing.zip")],
                            capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[2])
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "missing.zip" in result.stderr


@pytest.mark.parametrize("inputs", [torch.randn(3, 4), {"input": torch.randn(3, 4)}])
def test_warmup_refuses_a_bare_tensor_or_dict(inputs):
    with pytest.raises(TypeError, match=r"list of inputs.*\[x\]"):
        compiler.warmup(torch.nn.Linear(4, 4), inputs, progress=False)

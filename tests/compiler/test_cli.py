"""`python -m compiler inspect|warmup|cache` end to end (in-process, through compiler.cli.main)."""
from __future__ import annotations

from compiler.cli import main, parse_shape


def test_inspect_prints_report_and_sources(capsys):
    assert main(["inspect", "models.gpt:tiny_sdpa_gqa"]) == 0
    out = capsys.readouterr().out
    assert "attention: attention_" in out and "@triton.jit" in out


def test_inspect_dump_writes_sources(tmp_path, capsys):
    assert main(["inspect", "models.gpt:tiny_sdpa_gqa", "--dump", str(tmp_path)]) == 0
    assert any("@triton.jit" in path.read_text() for path in tmp_path.glob("*.py"))


def test_warmup_then_export_and_import(tmp_path, capsys):
    assert main(["warmup", "models.gpt:tiny_sdpa_gqa", "--mode", "default",
                 "--shapes", "batch=1,length=16", "batch=1,length=40"]) == 0
    assert "warmed 2 shape(s)" in capsys.readouterr().out
    bundle = tmp_path / "cache.zip"
    assert main(["cache", "export", str(bundle)]) == 0
    assert main(["cache", "import", str(bundle)]) == 0
    assert "imported" in capsys.readouterr().out


def test_parse_shape():
    assert parse_shape("batch=8,length=1024,name=x") == {"batch": 8, "length": 1024, "name": "x"}

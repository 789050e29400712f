"""The command line: report on hf:gpt2 (shrunk), a file target, JSON output, pass listing, errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from rewriter.cli import main


def test_cli_report_hf_gpt2(tmp_path, capsys):
    pytest.importorskip("transformers")
    out = tmp_path / "r.json"
    assert main(["report", "hf:gpt2", "--layers", "2", "--seq", "32", "--estimate-for", "H100",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "pass attention: 2 rewritten, 0 skipped" in text
    assert "h.1.attn" in text and "causal" in text
    data = json.loads(out.read_text())
    assert [s["status"] for s in data["sites"]] == ["rewritten", "rewritten"]
    assert data["sites"][0]["est_speedup"] > 1


def test_cli_file_target(tmp_path, capsys):
    f = tmp_path / "mymodel.py"
    f.write_text(textwrap.dedent("""
        import torch
        def make():
            class M(torch.nn.Module):
                def forward(self, q, k, v):
                    return torch.einsum("bqd,bkd->bqk", q, k).softmax(-1) @ v
            return M(), (torch.randn(2, 8, 16), torch.randn(2, 8, 16), torch.randn(2, 8, 16))
    """))
    assert main(["report", f"{f}:make"]) == 0
    assert "1 rewritten" in capsys.readouterr().out


def test_cli_passes_lists_attention(capsys):
    assert main(["passes"]) == 0
    assert any(line.startswith("attention ") for line in capsys.readouterr().out.splitlines())


def test_cli_bad_target_is_a_clear_error(capsys):
    assert main(["report", "nowhere.py:make"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["report", "hf:gpt2", "--passes", "nope"]) == 2
    assert "unknown pass" in capsys.readouterr().err


def test_python_dash_m():
    r = subprocess.run([sys.executable, "-m", "rewriter", "passes"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "attention" in r.stdout

"""The benchmark entry point parses, lists the issue's cases, and (tiny CPU smoke mode, kernels under
the interpreter) writes JSON whose fused rows match the reference. Timings need a GPU."""

import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"   # on sys.path via pyproject's pytest pythonpath

import run_all  # noqa: E402

pytestmark = pytest.mark.interpreter   # Triton kernels on CPU tensors: TRITON_INTERPRET=1


def test_dry_run_lists_the_issue_cases(capsys):
    assert run_all.main(["--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 14, lines   # 5 layers x 2 deltas decode + 4 layers prefill
    assert sum("prefill" in line and "T=8192" in line for line in lines) == 4
    assert any("mlp_gate_up" in line and "inner=28672" in line and "delta=0.25" in line for line in lines)


def test_smoke_run_writes_json_with_correct_fused_rows(tmp_path):
    assert run_all.main(["--smoke", "--phase", "decode", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "mohd_ops.json").read_text())
    assert {"gpu", "torch", "triton", "git_sha"} <= set(payload["env"])
    fused = [r for r in payload["results"] if r["provider"] == "fused"]
    assert [r["layer"] for r in fused] == ["read", "write", "write_mix"]
    for row in fused:
        assert row["rel_err_vs_naive"] <= 1e-5, row
    assert (tmp_path / "mohd_ops.txt").read_text().count("fused") == 3

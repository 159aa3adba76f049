"""The `helios` command line."""
from cluster.cli import main


def test_generate_prints_text_and_exit_summary(smollm2, capsys):
    assert main(["generate", "--no-exits", "--max-tokens", "6", "--depth", "12", "The capital of France is"]) == 0
    out = capsys.readouterr().out
    assert "The capital of France is" in out and "depth 12/30" in out and "greedy exits 6" in out


def test_missing_model_is_a_clear_error(smollm2, tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "missing"), "hi"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err

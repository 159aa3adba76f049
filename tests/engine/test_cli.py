"""The `helios` command line."""
import pytest

from cluster.cli import main


def test_generate_prints_text_and_exit_summary(smollm2, capsys):
    assert main(["generate", "--no-exits", "--max-tokens", "6", "--depth", "12", "The capital of France is",
                 "--set", "max_batch_size=2", "kv_fill=copy"]) == 0
    out = capsys.readouterr().out
    assert "The capital of France is" in out and "depth 12/30" in out and "greedy exits 6" in out


def test_missing_model_is_a_clear_error(smollm2, tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "missing"), "hi"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_any_engine_field_is_settable_and_a_typo_is_refused_naming_it(smollm2):
    with pytest.raises(SystemExit, match="--set: max_batch: Extra inputs are not permitted"):
        main(["generate", "--set", "max_batch=2", "--", "hi"])
    with pytest.raises(SystemExit, match="--set takes FIELD=VALUE"):
        main(["generate", "--set", "dtype", "--", "hi"])

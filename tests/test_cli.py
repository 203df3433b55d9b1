from leankv_hf.cli import main


def test_generate_prints_text_and_bytes(capsys):
    assert main(["generate", "--prompt", "The capital of France is", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "Paris" in out
    assert "MiB stored" in out and "x" in out.splitlines()[-1]


def test_unknown_model_is_a_clear_error(capsys):
    assert main(["generate", "--model", "nope", "--prompt", "hi"]) == 2
    assert "smollm2-135m" in capsys.readouterr().err

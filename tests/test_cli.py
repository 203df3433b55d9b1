from leankv_hf.cli import main


def test_generate_prints_text_and_bytes(capsys):
    assert main(["generate", "--prompt", "The capital of France is", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "Paris" in out
    assert "MiB stored" in out and "x" in out.splitlines()[-1]


def test_unknown_model_is_a_clear_error(capsys):
    assert main(["generate", "--model", "nope", "--prompt", "hi"]) == 2
    assert "smollm2-135m" in capsys.readouterr().err


def test_compress_once_then_answer_from_the_saved_context(monkeypatch, tmp_path, capsys):
    """`leankv compress` saves a compressed context; `leankv generate --cache-dir` continues it without re-reading
    the document, answering exactly as the same cache built and used through the Python API."""
    import torch
    from helpers import TINY_PROMPT, generate, lively

    import leankv_hf.models
    from leankv_hf import SparseHeadCache, prefill
    from leankv_hf.testing import tiny_tokenizer

    model, tok = lively("llama"), tiny_tokenizer()
    monkeypatch.setattr(leankv_hf.models, "load_model", lambda name, dtype=None, device=None: (model, tok))
    document = tmp_path / "doc.txt"
    document.write_text(TINY_PROMPT * 2)
    saved = tmp_path / "ctx"
    spec = "sparse:adakv@0.5,reconstruct"
    assert (
        main(["compress", "--context", str(document), "--cache", spec, "--out", str(saved), "--prefill-chunk", "64"])
        == 0
    )
    line = capsys.readouterr().out
    assert "context tokens compressed in" in line and str(saved) in line and "MiB stored" in line
    assert main(["generate", "--cache-dir", str(saved), "--prompt", " and then", "--max-new-tokens", "6"]) == 0
    loaded, answer = capsys.readouterr().out.splitlines()[:2]
    assert loaded.startswith(f"[{saved}] loaded in ")

    context = tok(TINY_PROMPT * 2, return_tensors="pt").input_ids
    cache = prefill(model, SparseHeadCache(model, budget=0.5, scorer="reconstruct"), context, chunk_size=64)
    ids = torch.cat([context, tok(" and then", add_special_tokens=False, return_tensors="pt").input_ids], 1)
    out = generate(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, cache, max_new_tokens=6)
    assert answer == tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_generate_from_a_missing_cache_dir_is_a_clear_error(tmp_path, capsys):
    assert main(["generate", "--cache-dir", str(tmp_path / "none"), "--prompt", "hi"]) == 2
    assert "no saved leankv cache" in capsys.readouterr().err

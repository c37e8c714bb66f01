

def test_weights_size_counts_the_weights_not_the_tokenizer_saved_beside_them(tmp_path):
    """An adapter's size in the compare report: a gemma tokenizer.json alone is 33 MB, a soft prompt 51 kB."""
    from ollama_ft.runs import tree_size, weights_size

    (tmp_path / "adapter_model.safetensors").write_bytes(b"w" * 100)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "pytorch_model.bin").write_bytes(b"w" * 10)
    (tmp_path / "tokenizer.json").write_bytes(b"t" * 1000)
    (tmp_path / "adapter_config.json").write_bytes(b"{}")
    assert weights_size(tmp_path) == 110 and tree_size(tmp_path) == 1112

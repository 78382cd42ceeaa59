"""The evaluation protocol as PROTOCOL.md states it, each figure checked against an independent
recomputation: pydoc's text and split, every corpus's window shape and seeds, what the recipe
hash covers, the random models' published shapes and generator, provenance digests, the hub."""
import hashlib

import pytest
import torch

from compress.data import calibration_samples, load_corpus, window_shape
from compress.recipe import CalibrationSettings, EvaluationSettings, recipe_from_dict
from compress.sources import byte_tokenizer


def _pydoc_bytes() -> torch.Tensor:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))      # PROTOCOL.md, verbatim
    return torch.tensor(list(text.encode()))


def test_pydoc_defaults_are_the_protocol_windows_and_samples():
    """The defaults a plain `compress eval` / `compress quantize --method gptq` uses: the first
    20 windows of 1024 tokens, and 64 x 512 calibration tokens from len(ids) // 2."""
    from compress.pipeline import Session, evaluation_windows

    ids = _pydoc_bytes()
    session = Session.open("random:tiny")                       # byte tokenizer: ids are bytes
    windows = evaluation_windows(session, EvaluationSettings())
    assert windows.shape == (20, 1024)
    assert torch.equal(windows.flatten(), ids[: 20 * 1024])
    s = CalibrationSettings()
    calib = calibration_samples(session.corpus, s.samples, s.seq_len)
    assert calib.shape == (64, 512)
    half = len(ids) // 2
    assert torch.equal(calib.flatten(), ids[half: half + 64 * 512])


def test_every_corpus_has_its_protocol_window_shape(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    assert window_shape("pydoc", None, None) == (1024, 20)
    assert window_shape("wikitext", None, None) == (2048, None)        # every full window
    assert window_shape("random", None, None) == (2048, 4)
    assert window_shape(str(tmp_path / "a.txt"), None, None) == (1024, 20)
    assert window_shape("pydoc", 256, 3) == (256, 3)


def test_random_corpus_is_seeded_as_documented():
    corpus = load_corpus("random", None, 1000)
    assert torch.equal(corpus.eval_ids, torch.randint(
        1, 1000, (8 * 2048,), generator=torch.Generator().manual_seed(0)))
    assert torch.equal(corpus.calib_ids, torch.randint(
        1, 1000, (256 * 2048,), generator=torch.Generator().manual_seed(1)))
    assert "seed 1" in corpus.calib_source


def test_text_is_tokenized_without_special_tokens(tmp_path):
    """A tokenizer that adds BOS by default (Llama 3's) must not put one into the stream."""
    from tokenizers.processors import TemplateProcessing

    tokenizer = byte_tokenizer()
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 256)])
    assert tokenizer("ab").input_ids == [256, 97, 98]            # the stand-in adds BOS
    text = "hello world. " * 50
    (tmp_path / "a.txt").write_text(text)
    corpus = load_corpus(str(tmp_path / "a.txt"), tokenizer)
    assert torch.cat([corpus.eval_ids, corpus.calib_ids]).tolist() == list(text.encode())


def test_hub_names_map_to_dataset_and_config(monkeypatch):
    import datasets

    asked = []

    def load_dataset(path, config, split):
        asked.append((path, config, split))
        return datasets.Dataset.from_dict({"text": [f"{split} text " * 20]})

    monkeypatch.setattr("compress.data.hub_reachable", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    corpus = load_corpus("wikitext", byte_tokenizer())
    assert asked == [("wikitext", "wikitext-2-raw-v1", "test"),
                     ("wikitext", "wikitext-2-raw-v1", "train")]
    assert bytes(corpus.eval_ids.tolist()).decode() == "test text " * 20
    assert bytes(corpus.calib_ids.tolist()).decode() == "train text " * 20
    asked.clear()
    load_corpus("someone/data:cfg", byte_tokenizer())
    assert asked[0] == ("someone/data", "cfg", "test")


def test_an_id_equal_to_the_vocabulary_size_is_refused(tmp_path):
    from compress.errors import UserError

    (tmp_path / "a.txt").write_text("caf\u00e9 " * 200)         # byte ids up to 195
    with pytest.raises(UserError, match="tokenizes to id 195, but the model has 195 embeddings"):
        load_corpus(str(tmp_path / "a.txt"), byte_tokenizer(), vocab_size=195)


def test_the_hash_covers_model_passes_and_calibration_shape():
    def digest(**overrides):
        data = {"passes": [{"pass": "gptq", "bits": 4, "group_size": 64}], **overrides}
        return recipe_from_dict(data, "r").resolved()["hash"]

    plain = digest()
    assert digest(model="random:tiny") != digest(model="smollm2-135m")
    assert digest(passes=[{"pass": "gptq", "bits": 8}]) != plain
    assert digest(calibration={"seq_len": 256}) != plain
    assert digest(calibration={"samples": 32}) != plain
    assert digest(corpus="random") != plain
    assert recipe_from_dict({"passes": [{"pass": "rtn"}]}, "r").corpus == "pydoc"


# Published configs (config.json on the hub) of the models PROTOCOL.md names.
PUBLISHED = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                      vocab_size=128256, tie_word_embeddings=False,
                      max_position_embeddings=8192, rms_norm_eps=1e-5,
                      rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    "llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                        vocab_size=128256, tie_word_embeddings=True,
                        max_position_embeddings=131072, rms_norm_eps=1e-5,
                        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
                                         "factor": 32.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 8192}),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                         vocab_size=49152, tie_word_embeddings=True,
                         max_position_embeddings=8192, rms_norm_eps=1e-5,
                         rope_parameters={"rope_type": "default", "rope_theta": 100000.0}),
}


@pytest.mark.parametrize("shape", sorted(PUBLISHED))
def test_random_shapes_are_the_published_configs(shape):
    from compress.shapes import llama_config

    config = llama_config(shape)
    for key, value in PUBLISHED[shape].items():
        assert getattr(config, key) == value, key
    assert config.initializer_range == 0.02                      # PROTOCOL.md: normal, std 0.02


def test_random_models_are_reproducible_std_002_and_leave_the_global_generator():
    from compress.sources import load_random

    torch.manual_seed(123)
    expected_next = torch.rand(4)
    torch.manual_seed(123)
    first = load_random("tiny").model
    assert torch.equal(torch.rand(4), expected_next)             # global RNG state restored
    torch.manual_seed(7)
    again = load_random("tiny").model
    for a, b in zip(first.parameters(), again.parameters()):
        assert torch.equal(a, b)
    weight = first.model.layers[0].mlp.up_proj.weight
    assert abs(weight.std().item() - 0.02) < 0.001


def test_provenance_sha256_is_the_file_digest(tmp_path):
    from compress.sources import file_sha256

    data = bytes(range(256)) * 9000                              # > 2 blocks of 1 MiB
    (tmp_path / "f.bin").write_bytes(data)
    assert file_sha256(str(tmp_path / "f.bin")) == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "yes"])
def test_hf_hub_offline_spellings_mean_offline(value, monkeypatch):
    from compress.hub import hub_reachable

    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    monkeypatch.setattr("socket.getaddrinfo", lambda *a: [("ok",)])
    assert hub_reachable() is False


def test_a_corpus_that_fits_exactly_gives_every_window_and_sample():
    from compress.data import TokenizedCorpus, eval_windows

    corpus = TokenizedCorpus("t", torch.arange(4 * 16), torch.arange(3 * 8), "second half")
    assert eval_windows(corpus, 16, None).shape == (4, 16)      # every full window
    assert eval_windows(corpus, 16, 4).shape == (4, 16)
    assert calibration_samples(corpus, 3, 8).shape == (3, 8)


def test_every_row_of_a_parquet_or_jsonl_file_is_read(tmp_path):
    import pandas

    rows = [f"row {i} " * 30 for i in range(3)]
    pandas.DataFrame({"text": rows, "id": [0, 1, 2]}).to_parquet(tmp_path / "a.parquet")
    (tmp_path / "a.jsonl").write_text("".join('{"text": "%s"}\n' % row for row in rows))
    for name in ("a.parquet", "a.jsonl"):
        corpus = load_corpus(str(tmp_path / name), byte_tokenizer())
        stream = torch.cat([corpus.eval_ids, corpus.calib_ids]).tolist()
        assert stream == list("\n\n".join(rows).encode()), name


def test_an_evaluation_window_must_predict_a_token():
    from compress.errors import UserError

    with pytest.raises(UserError, match="seq_len must be an integer >= 2"):
        EvaluationSettings(seq_len=1)


def test_calibration_and_evaluation_flags_reach_the_saved_recipe_and_results(tmp_path):
    import json

    from compress.cli import main

    (tmp_path / "c.txt").write_text("some text. " * 400)
    out = tmp_path / "g"
    assert main(["quantize", "random:tiny", "--method", "gptq", "--group-size", "32",
                 "--corpus", str(tmp_path / "c.txt"), "--calib-samples", "3",
                 "--calib-seq-len", "24", "--eval", "--windows", "2", "--seq-len", "40",
                 "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["recipe"]["corpus"] == str(tmp_path / "c.txt")
    assert results["recipe"]["calibration"] == {"samples": 3, "seq_len": 24, "batch_size": 8}
    assert results["protocol"]["calibration"]["samples"] == 3
    assert (results["protocol"]["eval_windows"], results["protocol"]["eval_seq_len"]) == (2, 40)
    assert results["protocol"]["corpus"] == str(tmp_path / "c.txt")

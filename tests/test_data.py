"""Corpus splits follow PROTOCOL.md: fixed windows, calibration never overlaps evaluation."""
import pandas
import pytest
import torch

from compress.data import calibration_samples, eval_windows, load_corpus
from compress.errors import UserError
from compress.sources import byte_tokenizer


def test_pydoc_split_is_fixed_and_disjoint():
    corpus = load_corpus("pydoc", byte_tokenizer())
    windows = eval_windows(corpus, 1024, 20)
    calib = calibration_samples(corpus, 64, 512)
    assert windows.shape == (20, 1024) and calib.shape == (64, 512)
    stream = torch.cat([corpus.eval_ids, corpus.calib_ids])
    half = len(stream) // 2
    assert torch.equal(windows.flatten(), stream[: 20 * 1024])
    assert torch.equal(calib.flatten(), stream[half: half + 64 * 512])


def test_local_text_and_jsonl_files(tmp_path):
    text = "hello world. " * 400
    (tmp_path / "a.txt").write_text(text)
    (tmp_path / "a.jsonl").write_text('{"text": "%s"}\n' % text)
    pandas.DataFrame({"text": [text]}).to_parquet(tmp_path / "a.parquet")
    expected = torch.tensor(list(text.encode()))
    for name in ("a.txt", "a.jsonl", "a.parquet"):
        corpus = load_corpus(str(tmp_path / name), byte_tokenizer())
        assert eval_windows(corpus, 64, None).shape[1] == 64
        # One stream, split in halves: evaluation from the start, calibration from the middle.
        assert torch.equal(torch.cat([corpus.eval_ids, corpus.calib_ids]), expected)


def test_too_few_windows_is_a_user_error(tmp_path):
    (tmp_path / "small.txt").write_text("tiny")
    with pytest.raises(UserError, match="evaluation windows"):
        eval_windows(load_corpus(str(tmp_path / "small.txt"), byte_tokenizer()), 64, 1)


def test_random_corpus_is_fixed_disjoint_and_inside_the_vocabulary():
    first, again = load_corpus("random", byte_tokenizer(), 128256), load_corpus("random", None,
                                                                                  128256)
    assert torch.equal(first.calib_ids, again.calib_ids)         # fixed seeds
    calib = calibration_samples(first, 128, 2048)                 # the GPTQ-8B timing protocol
    assert calib.shape == (128, 2048)
    assert calib.min() >= 1 and calib.max() < 128256 and calib.max() > 120000
    assert not torch.equal(first.eval_ids[:1000], first.calib_ids[:1000])


def test_random_models_say_where_they_were_built():
    from compress.sources import load_random

    assert load_random("tiny").provenance["built_on"] == "cpu"


@pytest.mark.gpu
def test_a_large_random_model_for_the_cpu_is_built_on_the_gpu():
    """Initializing a billion weights takes minutes on a CPU and seconds on a GPU."""
    from compress.sources import load_random

    loaded = load_random("llama3.2-1b", torch.bfloat16, device="cpu")
    assert loaded.provenance["built_on"] == "cuda"
    assert all(p.device.type == "cpu" for p in loaded.model.parameters())


def test_a_tokenizer_that_outgrows_the_model_vocabulary_is_one_line(tmp_path):
    (tmp_path / "a.txt").write_text("caf\u00e9 " * 200)       # byte ids up to 0xc3 = 195
    assert load_corpus(str(tmp_path / "a.txt"), byte_tokenizer(), vocab_size=196).eval_ids.max() \
        == 195
    with pytest.raises(UserError, match=r"tokenizes to id 195, but the model has 100 embeddings"):
        load_corpus(str(tmp_path / "a.txt"), byte_tokenizer(), vocab_size=100)


def test_random_shapes_carry_the_published_rope_and_context():
    from compress.shapes import llama_config

    small = llama_config("llama3.2-1b")
    assert small.max_position_embeddings == 131072
    assert small.rope_parameters == {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 8192}
    assert llama_config("llama3-8b").rope_parameters == {"rope_type": "default",
                                                         "rope_theta": 500000.0}


def test_a_hub_dataset_without_text_is_a_user_error(monkeypatch):
    """Seen through a stand-in for the hub: a dataset with no 'text' column was a KeyError."""
    import datasets

    splits = {"test": datasets.Dataset.from_dict({"sentence": ["a b"]}),
              "train": datasets.Dataset.from_dict({"text": ["a b"]})}
    monkeypatch.setattr("compress.data.hub_reachable", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", lambda path, config, split: splits[split])
    with pytest.raises(UserError, match="no 'text' column in its test split; columns: sentence"):
        load_corpus("someone/glue-like", byte_tokenizer())
    splits["test"] = datasets.Dataset.from_dict({"text": ["hello " * 40, None]})
    with pytest.raises(UserError, match="every 'text' value of its test split"):
        load_corpus("someone/glue-like", byte_tokenizer())
    splits["test"] = datasets.Dataset.from_dict({"text": ["hello " * 40, "world"]})
    corpus = load_corpus("someone/glue-like", byte_tokenizer())
    assert bytes(corpus.eval_ids.tolist()).decode() == "hello " * 40 + "\n\nworld"


def test_a_folder_as_corpus_is_named_a_folder_not_missing(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "a b c"}\n')
    with pytest.raises(UserError, match="is a folder"):
        load_corpus(str(tmp_path), byte_tokenizer())

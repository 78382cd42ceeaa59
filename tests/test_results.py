"""What results.json records: the running environment and the protocol as given; a write that
fails leaves no temporary file."""
import os

import pytest
import torch


def test_results_record_the_running_environment_and_the_protocol_as_given():
    import platform

    import transformers

    import compress
    from compress.evaluate.results import build_results

    protocol = {"seq_len": 16, "windows": 1}
    doc = build_results({"source": "x"}, None, protocol, {"ppl": 1.0})
    env = doc["environment"]
    assert doc["protocol"] == protocol
    assert env["compress"] == compress.__version__ and env["torch"] == torch.__version__
    assert env["transformers"] == transformers.__version__
    assert env["python"] == platform.python_version()
    assert env["threads"] == torch.get_num_threads()


def test_a_results_write_that_fails_leaves_no_temporary_file(tmp_path):
    from compress.evaluate.results import write_json

    with pytest.raises(TypeError):
        write_json({"bad": object.__new__(type("X", (), {"__str__": None}))}, str(tmp_path / "r.json"))
    assert os.listdir(tmp_path) == []

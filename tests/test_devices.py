"""Device selection: a device that is not there is a one-line error naming exactly the device asked for."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from charnn.cli import main
from charnn.devices import pick_device
from charnn.errors import CharnnError

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


@no_cuda
@pytest.mark.parametrize("asked", ["cuda", "cuda:7", "cuda:0"])
def test_a_missing_cuda_device_is_named_as_asked(asked):
    with pytest.raises(CharnnError) as e:
        pick_device(asked)
    assert str(e.value) == (f"device={asked!r} was asked for but CUDA is not available; use device='cpu' or "
                            "device='auto'")


@no_cuda
def test_charnn_train_names_the_cuda_device_asked_for(small_corpus, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", str(small_corpus), "--device", "cuda:7", "--max-steps", "1",
                                       "--out", str(out)])
    assert result.exit_code == 2
    assert result.output == ("error: --device cuda:7 was asked for but CUDA is not available; use --device cpu or "
                             "--device auto\n")


def test_a_cuda_index_beyond_the_machines_devices_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(CharnnError) as e:
        pick_device("cuda:7")
    assert str(e.value) == ("device='cuda:7' was asked for but this machine has 2 CUDA devices, cuda:0 to cuda:1; "
                            "use one of those, or cuda")
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(CharnnError, match="has one CUDA device, cuda:0; use one of those"):
        pick_device("cuda:1")


def test_unknown_and_available_devices():
    with pytest.raises(CharnnError, match="unknown device 'gpu'; use auto, cpu, cuda, cuda:N or mps"):
        pick_device("gpu")
    assert pick_device("CPU") == torch.device("cpu") and pick_device(None).type in ("cpu", "cuda", "mps")

"""Shared fixtures: small corpora the project builds itself, and a tiny trained model."""

from __future__ import annotations

import os
from pathlib import Path

os.environ["OMP_NUM_THREADS"] = "1"  # also for the console scripts the tests start

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# One intra-op thread: tests compare runs bit for bit whatever the machine, the tiny
# models gain nothing from more, and OpenMP threads spinning against other busy
# processes slow a run by orders of magnitude.
torch.set_num_threads(1)


def shared_file(relative: str) -> Path:
    """A file under ../shared, or skip the test with the reason."""
    path = SHARED / relative
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared data folder ships beside the repository)")
    return path


@pytest.fixture(scope="session")
def docs_text() -> str:
    from charnn.corpora import corpus_text

    return corpus_text("python-docs", progress=False)


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory, docs_text) -> Path:
    """About 60k characters of English prose from the interpreter's documentation."""
    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    path.write_text(docs_text[:60_000], encoding="utf-8")
    return path


@pytest.fixture
def blow_up(monkeypatch):
    """``blow_up(trainer_class, net_attribute, when)``: from the first step at which ``when(trainer)`` holds,
    the trainer's loss and its network's weights turn non-finite, as a diverging run's do."""

    def patch(trainer_class, net_attribute: str, when) -> None:
        original = trainer_class.train_step

        def train_step(self, *batch):
            loss = original(self, *batch)
            if not when(self):
                return loss
            with torch.no_grad():
                for p in getattr(self, net_attribute).parameters():
                    p.fill_(float("nan"))
            return float("nan")

        monkeypatch.setattr(trainer_class, "train_step", train_step)

    return patch


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, small_corpus) -> Path:
    """A run directory with a tiny LSTM trained for a few dozen steps."""
    from charnn import TrainConfig, train

    out = tmp_path_factory.mktemp("runs") / "tiny"
    train(TrainConfig(corpus=[str(small_corpus)], preset="tiny", max_steps=40, eval_every=20, out=str(out), quiet=True))
    return out

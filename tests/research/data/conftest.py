"""Small corpora and tiny tokenizers shared by the data tests (built once per worker)."""

import pydoc_data.topics

import pytest

from fusedlm.research.data.corpus import Corpus
from fusedlm.research.data.tokenizer import train_tokenizer


@pytest.fixture(scope="session")
def english_docs() -> list[str]:
  """40 English documents of at most 3000 characters (pydoc topics, ~100 kB)."""
  topics = pydoc_data.topics.topics
  return [topics[name][:3000] for name in sorted(topics)[:40]]


@pytest.fixture(scope="session")
def english_corpus(english_docs) -> Corpus:
  return Corpus(name="english", train=english_docs[:34], validation=english_docs[34:])


@pytest.fixture(scope="session")
def wordpiece(english_docs):
  return train_tokenizer("wordpiece", english_docs, 800)


@pytest.fixture(scope="session")
def bpe(english_docs):
  return train_tokenizer("bpe", english_docs, 500)


@pytest.fixture(scope="session")
def byte_level():
  return train_tokenizer("byte", [])


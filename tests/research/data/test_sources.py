"""A config string picks the corpus source."""

import json

from fusedlm.research.data import sources
from fusedlm.research.data.corpus import Corpus


def test_names_and_suffixes_pick_the_source(tmp_path, monkeypatch):
  monkeypatch.setattr(sources, "builtin_corpus",
                      lambda fraction, cache_dir: Corpus(f"builtin {fraction}", ["a"], ["b"]))
  assert sources.load_corpus("builtin", validation_fraction=0.1).name == "builtin 0.1"
  assert sources.load_corpus("synthetic").name.startswith("synthetic-markov")
  (tmp_path / "d.jsonl").write_text("".join(json.dumps({"body": f"doc {i}"}) + "\n"
                                            for i in range(20)))
  corpus = sources.load_corpus(tmp_path / "d.jsonl", text_field="body")
  assert sorted(corpus.train + corpus.validation) == sorted(f"doc {i}" for i in range(20))
  (tmp_path / "t.txt").write_text("x\ny\n")
  corpus = sources.load_corpus(str(tmp_path / "*.txt"))
  assert corpus.train + corpus.validation == ["x\n", "y\n"]

"""SQuAD files and QA windows: every answer maps to tokens and back to its text,
including answers a window boundary cuts; bad files are refused by question id."""

import json

import numpy as np
import pytest

from fusedlm.research.data import qa_windows, squad
from fusedlm.research.data.tokenizer import train_tokenizer

CONTEXTS = [
    "The Eiffel Tower, built in 1889 for the World's Fair, stands in Paris. It was the"
    " tallest structure in the world until the Chrysler Building rose in New York in 1930.",
    "Python's heapq module implements a min-heap: heapq.merge() merges several sorted"
    " inputs lazily, while heappush and heappop keep the invariant in O(log n) time.",
    "Le café au lait, served in a wide bowl, is a breakfast drink of Lyon and Marseille;"
    " its price rose from 1.50 to 2.10 euros between 2019 and 2023.",
]
ANSWERS = [  # (context, question, answer text or None for unanswerable)
    (0, "When was the tower built?", "1889"),
    (0, "Where does it stand?", "Paris"),
    (0, "What overtook it?", "the Chrysler Building"),
    (0, "Where did that building rise?", "New York in 1930"),
    (1, "What does heapq implement?", "a min-heap"),
    (1, "Which function merges sorted inputs?", "heapq.merge()"),
    (1, "How fast are pushes?", "O(log n) time"),
    (2, "How is the drink served?", "in a wide bowl"),
    (2, "Which cities drink it?", "Lyon and Marseille"),
    (2, "What did it cost in 2023?", "2.10 euros"),
    (2, "Who invented it?", None),
]


def sample_file(path, version2=True):
  paragraphs = []
  for c, context in enumerate(CONTEXTS):
    qas = []
    for i, (k, question, answer) in enumerate(ANSWERS):
      if k != c or (answer is None and not version2):
        continue
      answers = [] if answer is None else [{"text": answer,
                                            "answer_start": context.index(answer)}]
      qas.append({"id": f"q{i}", "question": question, "answers": answers,
                  **({"is_impossible": answer is None} if version2 else {})})
    paragraphs.append({"context": context, "qas": qas})
  path.write_text(json.dumps({"version": "v2.0" if version2 else "1.1",
                              "data": [{"title": "sample", "paragraphs": paragraphs}]}))
  return path


@pytest.fixture(scope="module")
def tokenizers():
  texts = CONTEXTS + [q for _, q, _ in ANSWERS]
  return {"wordpiece": train_tokenizer("wordpiece", texts * 4, 400),
          "byte": train_tokenizer("byte", texts)}


def test_reader_keeps_questions_answers_and_version(tmp_path):
  data = squad.load_squad(sample_file(tmp_path / "v2.json"))
  assert data.version2 and len(data) == len(ANSWERS)
  assert data.questions[2].answers == (("the Chrysler Building",
                                        CONTEXTS[0].index("the Chrysler Building")),)
  assert not data.questions[-1].answerable
  v1 = squad.load_squad(sample_file(tmp_path / "v1.json", version2=False))
  assert not v1.version2 and len(v1) == len(ANSWERS) - 1
  again = squad.load_squad(squad.write_squad(data, tmp_path / "copy.json"))
  assert again.questions == data.questions and again.version2


# Windows long enough for the longest answer (21 bytes); the short ones cut answers.
@pytest.mark.parametrize("kind,seq_len,stride", [
    ("wordpiece", 32, 4), ("wordpiece", 26, 3), ("wordpiece", 128, 32),
    ("byte", 64, 8), ("byte", 48, 5), ("byte", 256, 64)])
def test_every_answer_maps_to_tokens_and_back(tmp_path, tokenizers, kind, seq_len, stride):
  tokenizer = tokenizers[kind]
  data = squad.load_squad(sample_file(tmp_path / "v2.json"))
  windows = qa_windows.make_windows(data, tokenizer, seq_len, stride, max_query_len=12)
  cut = 0
  for index, q in enumerate(data.questions):
    mine = [w for w in windows if w.question == index]
    assert mine and all(len(w.input_ids) <= seq_len for w in mine)
    # Consecutive windows start doc_stride context tokens apart and cover the context.
    assert mine[-1].offsets[-1, 1] == len(q.context.rstrip())
    labelled = [w for w in mine if w.start]
    if not q.answerable:
      assert not labelled
      continue
    text, start = q.answers[0]
    assert labelled, f"{q.qid}: no window holds {text!r}"
    for w in labelled:
      got = qa_windows.span_text(q.context, w.offsets, w.start - w.context_start,
                                 w.end - w.context_start)
      assert got == text, (q.qid, got, text)
      assert w.input_ids[w.context_start - 1] == tokenizer.sep_id
    for w in mine:
      if w.start:
        continue
      # A window without the label lacks the answer, whole or in part.
      whole = w.offsets[0, 0] <= start and w.offsets[-1, 1] >= start + len(text)
      assert not whole, (q.qid, "an unlabelled window holds the whole answer")
      cut += bool(((w.offsets[:, 0] < start + len(text)) & (w.offsets[:, 1] > start)).any())
  if seq_len < 128:  # one window each at 128 and 256
    assert cut > 0, "no answer was cut by a window boundary: the sample tests nothing"


def test_batches_frame_windows(tmp_path, tokenizers):
  tokenizer = tokenizers["wordpiece"]
  data = squad.load_squad(sample_file(tmp_path / "v2.json"))
  batches = qa_windows.SpanBatches(data, tokenizer, 40, 8, 12, batch_size=4, seed=0)
  rows = list(batches.eval_batches())
  assert sum(int(r["weights"].sum()) for r in rows) == len(batches)
  batch = rows[0]
  w = batches.windows[0]
  n = len(w.input_ids)
  np.testing.assert_array_equal(batch["input_ids"][0, :n], w.input_ids)
  assert batch["input_ids"][0, 0] == tokenizer.cls_id
  np.testing.assert_array_equal(batch["token_type_ids"][0, :n],
                                np.arange(n) >= w.context_start)
  np.testing.assert_array_equal(batch["padding_mask"][0], np.arange(40) < n)
  assert (batch["start_positions"][0], batch["end_positions"][0]) == (w.start, w.end)
  train = batches.batch(3)
  assert train["input_ids"].shape == (4, 40) and train["weights"].sum() == 4
  with pytest.raises(ValueError, match=r"doc_stride must be in \[1, 25\]"):
    qa_windows.make_windows(data, tokenizer, 40, 26, 12)
  with pytest.raises(ValueError, match="no room for the context"):
    qa_windows.make_windows(data, tokenizer, 14, 1, 12)
  gpt = train_tokenizer("bpe", CONTEXTS * 4, 300)
  with pytest.raises(ValueError, match=r"no \[CLS\]/\[SEP\]"):
    qa_windows.make_windows(data, gpt, 64, 8, 12)


def _edit(path, change):
  record = json.loads(path.read_text())
  change(record["data"][0]["paragraphs"])
  path.write_text(json.dumps(record))
  return path


def test_bad_files_are_refused_naming_the_question(tmp_path):
  def shift(paragraphs):
    paragraphs[0]["qas"][1]["answers"][0]["answer_start"] += 1
  path = _edit(sample_file(tmp_path / "a.json"), shift)
  with pytest.raises(ValueError, match=r"a.json: question 'q1': the answer 'Paris' does not"
                                       r" match its context at answer_start 65 \(the"
                                       r" context there reads 'aris\.'\)"):
    squad.load_squad(path)

  def repeat(paragraphs):
    paragraphs[1]["qas"][0]["id"] = "q0"
  with pytest.raises(ValueError, match="question 'q0': the id occurs twice"):
    squad.load_squad(_edit(sample_file(tmp_path / "b.json"), repeat))

  def unmarked(paragraphs):
    paragraphs[2]["qas"][-1]["is_impossible"] = False
  with pytest.raises(ValueError, match="question 'q10': no answers, and not marked"):
    squad.load_squad(_edit(sample_file(tmp_path / "c.json"), unmarked))

  def no_question(paragraphs):
    del paragraphs[0]["qas"][0]["question"]
  with pytest.raises(ValueError, match="question 'q0': missing field 'question'"):
    squad.load_squad(_edit(sample_file(tmp_path / "d.json"), no_question))
  (tmp_path / "e.json").write_text('{"data": [')
  with pytest.raises(ValueError, match="e.json is not valid JSON"):
    squad.load_squad(tmp_path / "e.json")
  (tmp_path / "f.json").write_text('[1, 2]')
  with pytest.raises(ValueError, match="not in SQuAD's format"):
    squad.load_squad(tmp_path / "f.json")
  with pytest.raises(FileNotFoundError, match="no SQuAD file"):
    squad.load_squad(tmp_path / "missing.json")


def test_split_keeps_a_context_on_one_side(tmp_path):
  data = squad.load_squad(sample_file(tmp_path / "v2.json"))
  train, validation = squad.split_questions(data, 0.9)  # the contexts hash to 0.81-0.96
  assert len(train) + len(validation) == len(data) and len(validation) == 8
  assert not {q.context for q in train.questions} & {q.context for q in validation.questions}
  with pytest.raises(ValueError, match="leaves an empty validation part"):
    squad.split_questions(data, 0.5)

"""fusedlm data layer: corpora, tokenizers, cached tokenized splits and batches.

Modules, one concern each:
  corpus          the Corpus type and train/validation splitting
  stdlib_corpus   the built-in corpus from the Python standard library
  synthetic       a Markov-chain corpus with an exactly known entropy rate
  stdlib_topics   the built-in labelled task (docstrings by library area)
  stdlib_qa       the built-in extractive-QA task (questions about docstring cards)
  stdlib_summaries  the built-in summarization pairs (docstring body -> summary)
  squad           SQuAD v1.1 / v2.0 files: read, check, split
  qa_windows      QA questions as windows of [CLS] question [SEP] context [SEP]
  parallel_text   (source, target) pairs and their seq2seq batches
  user_corpus     text files, folders, globs and JSON Lines
  sources         a config string -> Corpus
  tokenizer       train / load / save tokenizers (Hugging Face `tokenizers`)
  cache           tokenized splits as memory-mapped arrays, cached on disk
  partials        atomic publishing of cache entries; stale partials removed
  order           deterministic, resumable, per-process batch order
  packing         documents joined into a separator-delimited stream
  masking         BERT's 80/10/10 masking of one sequence
  causal, mlm, classification   the batch makers (qa_windows, parallel_text too)
"""

from fusedlm.research.data.cache import TokenizedSplit, tokenize_corpus, tokenize_split
from fusedlm.research.data.causal import CausalLMBatches
from fusedlm.research.data.classification import (
    ClassificationBatches,
    LabeledExamples,
    load_labeled_examples,
)
from fusedlm.research.data.corpus import Corpus
from fusedlm.research.data.mlm import MLMBatches
from fusedlm.research.data.sources import load_corpus
from fusedlm.research.data.stdlib_corpus import builtin_corpus
from fusedlm.research.data.synthetic import MarkovSource, SyntheticSpec, synthetic_corpus
from fusedlm.research.data.tokenizer import (
    Tokenizer,
    get_or_train_tokenizer,
    load_tokenizer,
    train_tokenizer,
)
from fusedlm.research.data.user_corpus import jsonl_corpus, text_corpus

__all__ = [
    "CausalLMBatches",
    "ClassificationBatches",
    "Corpus",
    "LabeledExamples",
    "MLMBatches",
    "MarkovSource",
    "SyntheticSpec",
    "TokenizedSplit",
    "Tokenizer",
    "builtin_corpus",
    "get_or_train_tokenizer",
    "jsonl_corpus",
    "load_corpus",
    "load_labeled_examples",
    "load_tokenizer",
    "synthetic_corpus",
    "text_corpus",
    "tokenize_corpus",
    "tokenize_split",
    "train_tokenizer",
]

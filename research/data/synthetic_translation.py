"""A built-in translation task with a known perfect answer, no download.

Two made-up languages. A source sentence is subject, verb, object and an
optional adverb, each noun phrase an optional plural marker, up to two
adjectives and a noun:

  source  [mo] ADJ* NOUN  VERB  [mo] ADJ* NOUN  [ADV]
  target  [ADV']  NOUN'[en] ADJ'+agr*  NOUN'[en] ADJ'+agr* ne  VERB'+agr

`translate` is the exact transduction, a pure function of the source, with:
  * reordering: the verb goes last (SVO -> SOV), adjectives follow their noun
    in mirrored order, the adverb moves to the front;
  * agreement: each adjective takes the suffix of its noun's gender and
    number (-a, -o; plural -ai, -oi), the verb that of its subject (-at, -ot;
    plural -un);
  * one-to-many and many-to-one words: some nouns and verbs become two words,
    the plural marker "mo" becomes the suffix -en on the noun, the object
    takes the case particle "ne".

e.g. "mo lufa kebo tirun dasi pelo" -> "kebo'en lufa'ai ... ne tirun'un"
(with the actual made-up words of `LEXICON`). The lexicon is fixed (its own
seed), so the task is the same everywhere; `synthetic_pairs` draws
`num_pairs` distinct sentences with a seed. Every held-out sentence is a
new combination of known words, so a model has to have learned the rules.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from fusedlm.research.data.parallel_text import ParallelText

NAME = "synthetic_translation"
NUM_PAIRS = 20_000
PLURAL = "mo"  # source plural marker
OBJECT_PARTICLE = "ne"
NOUN_PLURAL = "en"
ADJECTIVE_SUFFIX = {("a", False): "a", ("o", False): "o", ("a", True): "ai", ("o", True): "oi"}
VERB_SUFFIX = {("a", False): "at", ("o", False): "ot", ("a", True): "un", ("o", True): "un"}


@dataclasses.dataclass(frozen=True)
class Lexicon:
  nouns: dict[str, tuple[tuple[str, ...], str]]  # source -> (target words, gender)
  adjectives: dict[str, str]  # source -> target stem
  verbs: dict[str, tuple[str, ...]]  # source -> target words (the last one agrees)
  adverbs: dict[str, str]


@functools.lru_cache(maxsize=1)
def lexicon() -> Lexicon:
  """20 nouns (5 of them two target words), 10 adjectives, 10 verbs (3 of them
  two words) and 5 adverbs, spelled from syllables by a fixed seed."""
  rng = np.random.default_rng(20_240_617)
  used = {PLURAL, OBJECT_PARTICLE, NOUN_PLURAL}

  def word(consonants: str, vowels: str, syllables: int) -> str:
    while True:
      w = "".join(rng.choice(list(consonants)) + rng.choice(list(vowels))
                  for _ in range(syllables))
      if w not in used:
        used.add(w)
        return w

  source = lambda: word("bdfgklmprstvz", "aeiou", 2)
  target = lambda: word("chjnqwxy", "aiu", int(rng.integers(1, 3)) + 1)
  nouns = {source(): ((target(),) if i >= 5 else (target(), target()), "ao"[i % 2])
           for i in range(20)}
  adjectives = {source(): target() for _ in range(10)}
  verbs = {source(): (target(),) if i >= 3 else (target(), target()) for i in range(10)}
  adverbs = {source(): target() for _ in range(5)}
  return Lexicon(nouns, adjectives, verbs, adverbs)


def translate(source: str) -> str:
  """The one correct translation of a source sentence of the task.

  Raises:
    ValueError: a sentence outside the task's grammar or lexicon.
  """
  lex = lexicon()
  words = source.split()
  adverb = None
  if words and words[-1] in lex.adverbs:
    adverb = lex.adverbs[words.pop()]
  verb_at = [i for i, w in enumerate(words) if w in lex.verbs]
  if len(verb_at) != 1:
    raise ValueError(f"not a sentence of the synthetic task (one verb needed): {source!r}")
  subject, gender, plural = _noun_phrase(words[:verb_at[0]], source)
  obj, _, _ = _noun_phrase(words[verb_at[0] + 1:], source)
  *verb_words, verb_last = lex.verbs[words[verb_at[0]]]
  out = ([adverb] if adverb else []) + subject + obj + [OBJECT_PARTICLE]
  return " ".join(out + verb_words + [verb_last + VERB_SUFFIX[gender, plural]])


def _noun_phrase(words: list[str], source: str) -> tuple[list[str], str, bool]:
  """(target words, gender, plural) of [mo] ADJ* NOUN."""
  lex = lexicon()
  plural = bool(words) and words[0] == PLURAL
  words = words[1:] if plural else words
  if not words or words[-1] not in lex.nouns or not all(
      w in lex.adjectives for w in words[:-1]):
    raise ValueError(f"not a sentence of the synthetic task (bad noun phrase): {source!r}")
  noun_words, gender = lex.nouns[words[-1]]
  noun = list(noun_words)
  if plural:
    noun[-1] += NOUN_PLURAL
  suffix = ADJECTIVE_SUFFIX[gender, plural]
  adjectives = [lex.adjectives[w] + suffix for w in reversed(words[:-1])]
  return noun + adjectives, gender, plural


def _random_sentence(rng: np.random.Generator) -> str:
  lex = lexicon()

  def noun_phrase() -> list[str]:
    words = [PLURAL] if rng.random() < 0.4 else []
    words += list(rng.choice(list(lex.adjectives), size=int(rng.integers(0, 3)),
                             replace=False))
    return words + [str(rng.choice(list(lex.nouns)))]

  words = noun_phrase() + [str(rng.choice(list(lex.verbs)))] + noun_phrase()
  if rng.random() < 0.5:
    words.append(str(rng.choice(list(lex.adverbs))))
  return " ".join(words)


def synthetic_pairs(num_pairs: int = NUM_PAIRS, seed: int = 0) -> ParallelText:
  """`num_pairs` distinct (source, translate(source)) pairs drawn with `seed`."""
  rng = np.random.default_rng([seed, 7])
  sources: dict[str, None] = {}
  while len(sources) < num_pairs:
    sources.setdefault(_random_sentence(rng))
  sources_list = list(sources)
  return ParallelText(sources_list, [translate(s) for s in sources_list],
                      [f"{NAME}:{i}" for i in range(1, num_pairs + 1)], NAME)

"""A run's files beside its checkpoints: config.json and tokenizer/, written safely.

Workdir layout (self-contained):
  DIR/config.json          the run config (JSON) plus the resolved ModelConfig,
                           a classifier's label names and the tokenizer's
                           fingerprint; guards resumes
  DIR/tokenizer/           Tokenizer.save: the exact tokenizer of the run
  DIR/checkpoints/<step>/  Orbax checkpoints of the TrainState (runs.checkpoint)

Every run file is written through a temporary file in the same folder,
flushed to disk and renamed into place (`data.partials.publish`), and only
when its content changed: a kill while a resume writes them leaves the old
file whole, and a plain resume writes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

from fusedlm.research import run_config
from fusedlm.research.data import Tokenizer, load_tokenizer, partials
from fusedlm.research.models.config import RUNTIME_FIELDS, ModelConfig

CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"
# Keys config.json holds beside the run config: the ModelConfig the
# checkpoints were written for, a classifier's label names (label i), and the
# SHA-256 of the run's tokenizer (Tokenizer.fingerprint), which a tokenizer
# rebuilt after damage must match.
RESOLVED_MODEL = "resolved_model"
RESOLVED_LABELS = "resolved_label_names"
RESOLVED_TOKENIZER = "resolved_tokenizer_sha256"
RESOLVED_KEYS = (RESOLVED_MODEL, RESOLVED_LABELS, RESOLVED_TOKENIZER)


def write_run_files(workdir, config, tokenizer, model_cfg_dict: dict,
                    label_names=None) -> None:
  """config.json (+ the resolved ModelConfig, labels and tokenizer fingerprint)
  and tokenizer/ beside the checkpoints; each file atomically, and only if it
  changed (a plain resume writes nothing)."""
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  record = {**config.to_dict(), RESOLVED_MODEL: model_cfg_dict,
            RESOLVED_TOKENIZER: tokenizer.fingerprint}
  if label_names is not None:
    record[RESOLVED_LABELS] = list(label_names)
  partials.publish(workdir / CONFIG_FILE, run_config.to_json(record))
  tokenizer.save(workdir / TOKENIZER_DIR)


RESTORE_HINT = ("resume the run (fusedlm train with its --config and this --workdir), which"
                " rebuilds a damaged tokenizer from the recorded corpus and settings and"
                " checks it against config.json's fingerprint, or restore {what} from a copy"
                " of the run")


def read_tokenizer(workdir) -> Tokenizer:
  """The run's tokenizer; ValueError naming the damaged file and the way to recover."""
  folder = Path(workdir) / TOKENIZER_DIR
  if not folder.is_dir():
    raise FileNotFoundError(f"{workdir} has no {TOKENIZER_DIR}/ folder: the run's"
                            " tokenizer is needed to read and write text; "
                            + RESTORE_HINT.format(what=f"{TOKENIZER_DIR}/") + ".")
  try:
    return load_tokenizer(folder)
  except (ValueError, FileNotFoundError) as e:
    raise ValueError(f"{e}; {RESTORE_HINT.format(what=f'{TOKENIZER_DIR}/')}.") from e


def tokenizer_for_resume(workdir) -> tuple[Tokenizer | None, str | None]:
  """(the saved tokenizer, or None if it must be rebuilt; why it must be).

  A damaged tokenizer/ (a kill while an older fusedlm rewrote it, a disk
  error) is not fatal on resume: the run's data settings rebuild it, and
  `check_rebuilt_tokenizer` then compares the result with the recorded
  fingerprint before anything is written.
  """
  try:
    return read_tokenizer(workdir), None
  except (ValueError, FileNotFoundError) as e:
    return None, str(e).split("; resume the run")[0]


def check_rebuilt_tokenizer(workdir, tokenizer: Tokenizer, damage: str) -> str:
  """The notice that tokenizer/ was rebuilt; ValueError when the rebuilt one is
  not provably the run's (no recorded fingerprint, or a different one)."""
  path = Path(workdir) / CONFIG_FILE
  recorded = read_config_json(path).get(RESOLVED_TOKENIZER) if path.is_file() else None
  restore = f"restore {Path(workdir) / TOKENIZER_DIR} from a copy of the run"
  if recorded is None:
    raise ValueError(f"{damage}, and {path} records no tokenizer fingerprint to check a"
                     f" rebuilt one against; {restore}.")
  if recorded != tokenizer.fingerprint:
    raise ValueError(f"{damage}, and the tokenizer rebuilt from the run's corpus and"
                     f" settings differs from the one config.json records (SHA-256"
                     f" {recorded[:12]}..., rebuilt {tokenizer.fingerprint[:12]}...);"
                     f" {restore}.")
  return (f"{damage}; rebuilt it from the run's corpus and settings (its SHA-256 matches"
          " config.json's) and wrote it again")


# Fields that change which tokens batch(step) holds: a resume with any of them
# changed would silently train on other data than the checkpoint's run.
DATA_FIELDS = ("data.corpus", "data.tokenizer", "data.vocab_size", "data.seq_len",
               "data.mask_prob", "data.whole_word_masking", "data.task",
               "data.validation", "data.validation_fraction", "data.text_field",
               "data.text_pair_field", "data.label_field", "data.target_file",
               "data.source_field", "data.target_field", "data.header", "data.too_long",
               "data.packing", "data.validation_target_file", "data.doc_stride",
               "data.max_query_len", "train.batch_size", "train.seed", "nsp", "objective", "optimizer.accumulation_steps")


def check_resumable(workdir, config, model_cfg_dict: dict, *,
                    allow_data_change: bool = False) -> None:
  """Refuses to resume when the saved model or the data the batches come from
  differ from the current config; names every differing field.

  The saved config.json holds the resolved ModelConfig under RESOLVED_MODEL;
  data changes pass with allow_data_change (fusedlm train --allow_data_change).
  """
  path = Path(workdir) / CONFIG_FILE
  if not path.exists():
    return
  saved = read_config_json(path)
  saved_model = saved.get(RESOLVED_MODEL)
  # A field added to ModelConfig since the run was saved holds its default there.
  current_model = ModelConfig.from_dict(model_cfg_dict).to_dict()
  saved_model = (ModelConfig.from_dict(saved_model).to_dict() if saved_model is not None
                 else current_model)
  diffs = [diff for diff in run_config.diff_model(saved_model, current_model)
           if diff.split(":")[0] not in RUNTIME_FIELDS]
  if diffs:
    raise ValueError(
        f"the checkpoint in {workdir} was written for a different model; refusing"
        " to resume. Differing model fields (saved -> current): " + "; ".join(diffs)
        + ". Use a new --workdir or restore the config.")
  current = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  changed = []
  for field in DATA_FIELDS:
    old, new = _lookup(saved, field), _lookup(current, field)
    if old is not _MISSING and new is not _MISSING and old != new:
      changed.append(f"{field}: {old!r} -> {new!r}")
  if changed and not allow_data_change:
    raise ValueError(
        f"resuming {workdir} with different data would not continue the same run:"
        f" {'; '.join(changed)}. Restore those fields, use a new --workdir, or pass"
        " --allow_data_change to resume anyway.")


_MISSING = object()


def _lookup(tree: dict, dotted: str):
  for key in dotted.split("."):
    if not isinstance(tree, dict) or key not in tree:
      return _MISSING
    tree = tree[key]
  return tree


def read_config_json(path: Path) -> dict:
  """config.json as a dict; ValueError naming the file, and how to recover, when
  it is not JSON."""
  try:
    return json.loads(Path(path).read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(
        f"{path} is not valid JSON (damaged, or edited by hand?): {e}. Restore it from a"
        " copy of the run, or delete it and resume with the run's --config, which writes"
        " it again (the checkpoint's shapes are still checked against the model)") from e


"""fusedlm research: models, objectives, data, training and evaluation.

Packages:
  models/        ModelConfig and presets, attention, the shared Transformer block,
                 the encoder (BERT), decoder (GPT) and encoder-decoder
                 (Transformer), Hugging Face import
  objectives/    one record per objective (causal, mlm, classification, seq2seq) in one
                 registry: batches, model outputs, loss, metrics, reports
  data/          corpora, tokenizers, cached tokenized splits, batch makers

Training and its plumbing:
  run_config     every config default, validation, the ModelConfig of a run
  run_data       config.data -> tokenizer and train/eval batch makers
  optimizer      AdamW with a decay mask, schedules, clipping, accumulation
  steps          the TrainState and the pure, pmapped train and eval steps
  parallel       pmap plumbing: shard batches, replicate, host copies
  checkpoint     run folders: config.json, tokenizer, Orbax checkpoints; one
                 restore (whole state to resume, parameters only to reuse)
  run_logging    progress line, metrics.jsonl, TensorBoard, MFU
  warm_start     a pretrained run's parameters into a new model (fine-tuning)
  decoding       batched, jitted generation with the KV cache; seq2seq greedy,
                 sampling and beam search
  sampling       greedy / temperature / top-k / top-p token choice

Commands (python -m research.<name>; flags with underscores, one error path
and atomic JSON through command_line):
  train          train or resume an experiment config
  finetune       fine-tune a pretrained run on a labelled task
  evaluate       reload a checkpoint: loss, perplexity, accuracy, macro-F1
  generate       continue prompts with a decoder run
  translate      translate text or a file with a seq2seq run (BLEU, chrF)
  fill_mask      the top-k tokens for every [MASK] with an encoder run
  import_hf      a local Hugging Face BERT / GPT-2 folder -> a run folder
  plot           loss and metric curves from metrics.jsonl
"""

"""fusedlm research: models, objectives, data, training and evaluation.

This folder's top level holds only the commands (one module each, run as
`fusedlm <name>` or `python -m fusedlm.research.<module>`) and `run_config`;
the library is in sub-packages by concern. Imports go one way, down this list:

Commands (`cli` is the `fusedlm` dispatcher; no command imports another):
  train          train or resume an experiment config
  finetune       fine-tune a pretrained run on a labelled task
  evaluate       reload a checkpoint: loss, perplexity, accuracy, macro-F1, BLEU
  generate       continue prompts with a decoder run
  translate      translate text or a file with a seq2seq run (BLEU, chrF)
  fill_mask      the top-k tokens for every [MASK] with an encoder run
  import_hf      a local Hugging Face BERT / GPT-2 folder -> a run folder
  plot           loss and metric curves from metrics.jsonl
  bench_train    training throughput per attention implementation vs a plain step

  run_config     every config default, validation, the ModelConfig of a run

Sub-packages:
  training/      the training loop, the pure pmapped steps, the optimizer, the
                 evaluation pass, the training-throughput benchmark
  runs/          a run's folder and process: checkpoints, checksums, the workdir
                 lock, logs, warm starts, device plumbing, command-line plumbing
  inference/     generation with the KV cache, seq2seq decoding (beam search),
                 sampling, fill-mask
  objectives/    one record per objective (causal, mlm, classification, seq2seq) in
                 one registry: batches, model outputs, loss, metrics, reports
  models/        ModelConfig and presets, attention, the shared Transformer block,
                 the encoder (BERT), decoder (GPT) and encoder-decoder
                 (Transformer), Hugging Face import, what each attention
                 layer resolves to
  data/          corpora, tokenizers, cached tokenized splits, batch makers
"""

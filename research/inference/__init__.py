"""Using a trained model: decoding, sampling and masked-token prediction.

`generation` (a decoder continues prompts with its KV cache), `seq2seq_decoding`
(an encoder-decoder's greedy, sampled or beam-search output), `sampling`
(temperature, top-k, top-p) and `masked_lm` (fill-mask: an encoder's top
tokens for each mask).
"""

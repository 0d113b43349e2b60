"""Using a trained model: decoding, sampling and masked-token prediction.

`generation` (a decoder continues prompts with its KV cache), `seq2seq_decoding`
(an encoder-decoder's greedy, sampled or beam-search output, with length and
no-repeat constraints), `sampling` (temperature, top-k, top-p), `masked_lm`
(fill-mask: an encoder's top tokens for each mask) and `span_decoding`
(extractive QA: the best answer span across a question's windows).
"""

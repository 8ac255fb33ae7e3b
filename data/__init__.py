"""Data: sources, tokenizer, packing, SFT formatting and the stateful streaming loader (next-token pretraining)."""

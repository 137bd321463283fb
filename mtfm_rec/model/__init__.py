"""Model: heterogeneous tokenizer -> Hybrid Target Attention -> MMoE heads -> loss."""

"""dlm: a block-parallel diffusion language model engine. Token ids in, token ids out."""

"""The adaptation recipe: an autoregressive chat model becomes this project's block-diffusion model.

Modules, in the order the recipe runs them:
- `prompts`: the voice-assistant / phone-bot prompt set (templates × slots, deterministic).
- `teacher`: batched greedy and sampled replies from the AR teacher; its NLL of any reply.
- `data`: the dataset file (JSON Lines, token ids, held-out split) and training batches.
- `convert`: the AR checkpoint's spec becomes the "bd" family's (mask token, block sizes).
- `objective`, `train`: complementary-mask block-diffusion loss in the x_t ⊕ x_0 layout; resumable.
- `evaluate`: held-out quality and speed against the teacher; the quality bars.
- `export`: one int8 self-contained `dlm.bd_format` file.
- `pack`: files split into checksummed parts for the GPU machine and back.
- `pipeline`, `cli`: the steps over one run folder; `python -m dlm.adapt`.
"""

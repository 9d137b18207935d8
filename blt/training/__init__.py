"""Training from raw text, on top of the model and the weight formats.

data         files -> documents -> split -> id stream -> packed sequences; cached entropies
loop         TrainConfig and the training loop (AdamW, accumulation, autocast, DDP)
checkpoints  atomic training checkpoints and resume
distributed  torchrun's environment and the collectives the loop needs
evaluate     bits per byte over a stream
recipes      train_entropy, train_blt, evaluate_model: the jobs behind the CLI
"""

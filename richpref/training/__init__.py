"""Diffusion-DPO fine-tuning: the loss (dpo.py), Pick-a-Pic data and mixing (data.py), model parts and
tuned-weight outputs (models.py), the accelerate training loop (train.py), its launcher with restarts
(launcher.py) and the `richpref finetune` / `richpref evaluate` commands (cli.py)."""

"""What the tests share: tiny runs and data folders (runs), problems with known answers
(problems), and the records of offline W&B runs (wandb_records)."""

"""Training machinery: the trainer and what it counts, the model and tokenizer, attention, the head loss, the speed
levers proved on one batch, checkpoints, the loss guard, the mid-run bad-row policy and ending a run cleanly."""

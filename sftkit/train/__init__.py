"""Training: the job, the trainer, the speed levers, the model and what a run writes."""

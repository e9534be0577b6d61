"""Training: the accelerate loop, teacher pretraining and distillation runs."""

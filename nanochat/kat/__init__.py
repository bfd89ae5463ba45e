"""The KAT experiment: preference pairs, prompt density, the reward model, GRPO maths, diversity metrics and statistics."""

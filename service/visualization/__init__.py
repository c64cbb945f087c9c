"""Feature visualization: activation-maximisation jobs (objectives, the optimiser, the job manager)."""

"""Training: Hydra entry body, the step loop, parallel setup (process groups, expert dispatch, DeepSpeed),
checkpoints, metrics, optimizer and schedule. Everything that crosses processes lives here, never in model/."""

"""The pretraining engine on DeepSpeed: config schema, DeepSpeed config, optimizer and schedule,
checkpoints, validation, monitoring and the training loop (`trainer.Trainer`)."""

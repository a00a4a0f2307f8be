"""The pretraining engine on DeepSpeed: config schema, DeepSpeed config, optimizer and schedule,
checkpoints, validation, monitoring, and the training loops (`trainer.Trainer`, `finetuner.Finetuner`)."""

"""Training: the LightningModule, metrics, losses, optimizers, callbacks and the command line."""

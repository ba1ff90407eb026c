"""Models: the encoder and the LightningModules that train it."""

"""The training stack: driver (launch), Ray Train worker loop, checkpoints, optimiser, progress."""

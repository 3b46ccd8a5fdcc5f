"""MaX-DeepLab in pure PyTorch: the network, its losses, Hungarian matching and post-processing."""

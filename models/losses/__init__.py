"""The MaX-DeepLab losses: PQ-style, mask-ID cross-entropy, instance discrimination, semantic."""

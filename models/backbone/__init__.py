"""The MaX-DeepLab backbone: stem, bottleneck and axial blocks, stages, the axial ResNet."""

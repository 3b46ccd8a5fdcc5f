"""maxdeeplab: MaX-DeepLab panoptic segmentation trained with Ray and tracked in MLflow.

This package is assembled from the repository's top-level folders (each entry here is a link):
`models` <- `platform` <- `dashboards` <- `cli`, each layer importing only those to its left, and
`experiments` (the shipped YAMLs). See docs/architecture.md.
"""

"""COCO-panoptic data: reader, synthetic generator, deeplab2's augmentation, targets, loaders."""

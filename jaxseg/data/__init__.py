"""Data: the synthetic scenes generator (`synthetic`), its TFDS ArrayRecord builder (`builders`) and
joint image / target augmentations for grain pipelines (`augment`)."""

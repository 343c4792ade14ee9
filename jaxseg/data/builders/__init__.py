"""TFDS builders of jaxseg's datasets; importing a module registers its builder with TFDS."""

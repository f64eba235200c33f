"""The model layer: load a diffusers DiT pipeline (`lens`), its per-family site tables (`sites`), and
genuine PixArt pipelines of any size with seeded weights (`builders`)."""

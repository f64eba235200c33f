"""The trace layer: the one nnsight loop over the real denoising loop (`runner`), recording site
outputs into resumable stores (`capture`, `store`)."""

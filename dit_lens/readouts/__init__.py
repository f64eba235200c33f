"""Read-outs computed from traced runs: concept vectors (`vectors`) and per-word cross-attention maps
(`attention_maps`)."""

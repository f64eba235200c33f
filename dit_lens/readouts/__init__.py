"""Read-outs computed from traced runs: concept vectors (`vectors`)."""

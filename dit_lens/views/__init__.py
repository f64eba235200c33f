"""Views: static figures (`figures`, `study`) and the interactive explorer (`explorer`)."""

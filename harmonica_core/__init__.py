"""HarmoniCa learned feature caching for Diffusion Transformers: the algorithm as a library."""

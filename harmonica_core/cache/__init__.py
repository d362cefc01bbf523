"""The branch cache: what to compute at each step (`plan`), the methods that make plans (`methods`), and
the diffusers hooks that carry a plan out on a transformer (`hooks`). `plan` and `methods` import no torch."""

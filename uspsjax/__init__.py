"""uspsjax: train whole populations of USPS digit classifiers at once with jit + vmap."""

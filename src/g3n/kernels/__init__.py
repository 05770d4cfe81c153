"""g3n's Triton kernels and what they share: batch-1 products, the decode step's AltUp and attention, top-k sampling."""

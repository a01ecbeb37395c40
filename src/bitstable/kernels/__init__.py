"""``@triton.jit`` kernels. attention_core holds the arithmetic every attention kernel shares."""

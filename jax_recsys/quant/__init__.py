"""Row-wise INT4/INT8 quantization and the serving artifact.

`rowwise` and `artifact` are NumPy-only (the embedding server imports them);
`rowwise_jax` holds the in-graph JAX dequantization. Deliberately free of
imports so that importing the package never pulls in JAX.
"""

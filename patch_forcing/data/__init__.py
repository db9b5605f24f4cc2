"""Input: grain pipelines over digits, MNIST, tfds and arrays, and pre-encoded latent shards."""

"""aikd-jax: AI-KD self-knowledge distillation in JAX/Flax."""

__version__ = "0.1.0"

"""Model families, one package each, built on the virtual-expert layer (`swapmoe_jax.moe`)."""

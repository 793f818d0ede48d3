"""The LTS model: Flax linen modules and the weight importers for them.

Import from the submodules (``lts_jax.models.model``, ``lts_jax.models.darknet``, ...); this
package re-exports nothing, so importing one part does not pull in the others.
"""

"""Integrations with other libraries. ``tailattn.integrations.diffusers``: sparse attention and
attention capture for diffusers video pipelines (needs ``pip install tailattn[diffusers]``)."""

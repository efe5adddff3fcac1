"""Integrations with other libraries. ``tailattn.integrations.diffusers``: sparse attention and
attention capture for diffusers video pipelines (needs the ``diffusers`` extra:
``pip install -e '.[diffusers]'`` from a clone)."""

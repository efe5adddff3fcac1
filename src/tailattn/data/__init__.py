"""Attention data: shape presets (:mod:`.presets`), synthetic video-DiT q, k, v
(:mod:`.synthetic`) and capture files (:mod:`.capture`)."""

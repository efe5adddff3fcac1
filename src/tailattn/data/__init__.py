"""Attention data: synthetic video-DiT q, k, v (:mod:`.synthetic`) and capture files
(:mod:`.capture`)."""

"""Speed on the GPU, three levels, each against dense attention in the same run: the kernels
alone (:mod:`.kernel`), one call through ``tailattn.attention`` and one transformer step end to
end (later modules). Lab code: it imports the core, never the reverse."""

from .kernel import BenchRow, parse_shape, run, to_markdown

__all__ = ["BenchRow", "parse_shape", "run", "to_markdown"]

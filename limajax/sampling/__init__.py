"""LIMA's sampling (§4.1), the sampler kept apart from its drivers:

  sampler.py  Settings (LIMA's defaults, resolved once), the logit processors, State,
              prefill / decode (one compiled loop), Request / Completion, generate (batches)
  engine.py   the continuous-batching Engine (decode slots on its own thread; serve, chat and
              the demo's judge drive it) and TextStream (answers as text deltas)
  answers.py  `limajax sample`: GAIR prompt files in, answer files out (sample_file,
              sample_text, read_prompts)
"""

from limajax.sampling.answers import read_prompts, sample_file, sample_text
from limajax.sampling.engine import Engine, Job, TextStream
from limajax.sampling.sampler import Completion, Request, Settings, generate

# __all__ repeats the imports: it is the package's public surface, which ruff checks (F401).
__all__ = ["Completion", "Engine", "Job", "Request", "Settings", "TextStream", "generate",
           "read_prompts", "sample_file", "sample_text"]

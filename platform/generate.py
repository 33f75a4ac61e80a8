"""Stream text from a trained model:
`python -m platform.generate --checkpoint runs/tiny --prompt "The " [--max_new_tokens 200 ...]`.

Tokens are printed as they are produced. The prompt is run once; each new token is one call with the
model's state (no prefix is re-run), so this works the same for every architecture.
"""

import sys

from platform.training.cli import run_entry_point
from platform.training.inference import generate_cli

if __name__ == "__main__":
    sys.exit(run_entry_point(generate_cli))

"""`python -m lily_ext` prints what this installation was built with."""

import json

from . import build_info

print(json.dumps(build_info(), indent=2))

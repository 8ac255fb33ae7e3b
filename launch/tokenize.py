"""Tokenize text corpora once into Megatron `.bin/.idx` shards that training reads without tokenizing: the entry
point of the tokenize job (`data/pretokenize.py`; `--help` prints its manual, docs/data.md#the-tokenize-job).

    python launch/tokenize.py '/data/web/*.jsonl' --out /data/web-tok                 # the built-in BPE
    python launch/pretrain.py data=files 'data.paths=[/data/web-tok/*.bin]'
"""

import os
import sys

if __name__ == "tokenize":
    # While a launch/ script runs, this folder is first on sys.path, so the standard library's own
    # `import tokenize` (linecache, inspect, traceback, ...) finds this file: it then becomes that module.
    _STDLIB = os.path.join(os.path.dirname(os.__file__), "tokenize.py")
    with open(_STDLIB, "rb") as _source:
        exec(compile(_source.read(), _STDLIB, "exec"))
elif __name__ == "__main__":
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root, not launch/
    from data.pretokenize import main

    sys.exit(main())

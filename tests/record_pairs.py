"""``negpref`` CLI that also records the (forget, retain) index pairs of every micro-batch
this process trains on, to ``$NEGPREF_PAIRS_DIR/rank<R>.json`` (the process-count tests)."""

import json
import os
import sys
from pathlib import Path

from negpref import cli
from negpref.unlearn.trainer import UnlearnTrainer

seen: list[list[list[int]]] = []
collate = UnlearnTrainer.collate


def recording_collate(self, pairs):
    seen.append([list(p) for p in pairs])
    return collate(self, pairs)


UnlearnTrainer.collate = recording_collate
code = cli.main(sys.argv[1:])
rank = os.environ.get("RANK", "0")
Path(os.environ["NEGPREF_PAIRS_DIR"], f"rank{rank}.json").write_text(json.dumps(seen))
sys.exit(code)

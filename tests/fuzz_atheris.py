"""Coverage-guided fuzzing of the same targets as tests/test_fuzz.py, with atheris (libFuzzer).

Optional: CI runs the hypothesis harness (tests/test_fuzz.py); this is for long runs by hand.

    .venv/bin/pip install -e '.[fuzz]'            # atheris: a manylinux wheel, no compiler needed
    .venv/bin/python tests/fuzz_atheris.py toc -max_total_time=600
    .venv/bin/python tests/fuzz_atheris.py tar -max_total_time=600 -rss_limit_mb=2048

TARGET is one of toc, footer, member, frame, tar (the prefixes of tests/fuzz_corpus/). The files
of tests/fuzz_corpus/ for that target seed a working corpus in a temporary directory (or in
--corpus DIR, kept between runs); the other arguments go to libFuzzer. A crash is written as
crash-<sha1> in the current directory: once fixed, copy it into tests/fuzz_corpus/ under the
target's prefix, so that test_the_corpus_replays_cleanly replays it in CI.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import atheris

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

with atheris.instrument_imports(include=["lazyfs", "converter"]):
    from tests import test_fuzz  # the targets and their invariants
    from lazyfs.format import seekable

TARGETS = {
    "toc": lambda data: test_fuzz.check_toc_json(data),
    "footer": lambda data: test_fuzz.check_footer(data[-seekable.MAX_FOOTER_SIZE:], len(data)),
    "member": lambda data: test_fuzz.check_toc_member(data),
    "frame": lambda data: test_fuzz.check_toc_frame(data, None),
    "tar": lambda data: (test_fuzz.check_tar(data), test_fuzz.check_convert(data, "estargz")),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", choices=TARGETS)
    parser.add_argument("--corpus", help="working corpus directory (default: a temporary one)")
    args, libfuzzer_args = parser.parse_known_args()
    corpus = args.corpus or tempfile.mkdtemp(prefix=f"lazyfs-fuzz-{args.target}-")
    os.makedirs(corpus, exist_ok=True)
    for seed in test_fuzz.CORPUS.glob(f"{args.target}-*"):
        shutil.copy(seed, corpus)
    target = TARGETS[args.target]
    atheris.Setup([sys.argv[0], *libfuzzer_args, corpus], lambda data: target(bytes(data)))
    atheris.Fuzz()


if __name__ == "__main__":
    main()

"""What the command line shows: its output on stdout, its own messages and a progress bar on
stderr, and nothing of what the model libraries print while they import and load."""

from __future__ import annotations

import contextlib
import io
import logging
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

# FunASR and what it imports. Each prints or logs on its own: FunASR an ffmpeg notice and its
# version on import and `trust_remote_code` on the root logger per load; jieba, modelscope and
# transformers attach handlers of their own to stderr and set their loggers' levels on import.
# On a GPU, torch compiles the model at its first batches, after the load: the compiler's
# notes are no message of ours either.
LIBRARIES = ("funasr", "modelscope", "modelscope_hub", "jieba", "torchaudio", "transformers", "huggingface_hub", "hydra",
             "torch._dynamo", "torch._inductor")
_LIBRARY_MODULES = "(" + "|".join(map(re.escape, LIBRARIES)) + r")(\.|$)"


class Progress:
    """A bar on stderr that counts files, only on a terminal (nothing in a pipe or a log).
    Lines printed through ``write`` leave it intact, and it is cleared when the run ends."""

    def __init__(self, total: int, *, enabled: bool = True) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=total, unit="file", file=sys.stderr, leave=False, dynamic_ncols=True,
                         disable=not (enabled and sys.stderr.isatty()))

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self._bar.close()

    @property
    def shown(self) -> bool:
        return not self._bar.disable

    def stage(self, text: str) -> None:
        """Say what the run is doing."""
        self._bar.set_description_str(text)

    @contextlib.contextmanager
    def loading(self, model: str) -> Iterator[None]:
        """Says so while the model loads (the bar cannot move meanwhile)."""
        self.stage(f"loading model {Path(model).name or model}…")
        yield
        self._bar.unpause()  # the rate and the time left count files analysed, not the load
        self.stage("analysing")

    def advance(self, files: int = 1) -> None:
        self._bar.update(files)

    def write(self, line: str, *, err: bool = False) -> None:
        """A line of output (stdout) or a message (stderr), printed above the bar."""
        out = sys.stderr if err else sys.stdout
        if self.shown:
            self._bar.write(line, file=out)
        else:
            print(line, file=out)


class _Held(io.TextIOBase):
    """Stands in for stdout and stderr while the libraries load: what they write then is
    dropped. Loggers they set up meanwhile keep this stream as their own, so afterwards it
    passes writes on to stderr (never to stdout, which is the command's output)."""

    def __init__(self, after) -> None:
        super().__init__()
        self._after, self.holding = after, True

    @property
    def encoding(self) -> str:
        return getattr(self._after, "encoding", None) or "utf-8"

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return not self.holding and self._after.isatty()

    def write(self, text: str) -> int:
        if not self.holding:
            self._after.write(text)
        return len(text)

    def flush(self) -> None:
        if not self.holding:
            self._after.flush()


@contextlib.contextmanager
def library_output_held() -> Iterator[None]:
    """Around the import and load of the model: the libraries' prints, Python warnings and
    log records below ERROR are dropped. Our own log records and errors still show: they go
    through the CLI's handler, which writes to the real stderr."""
    held = _Held(sys.stderr)
    root, ours = logging.getLogger(), logging.getLogger("emotion")
    root_level, our_level = root.level, ours.level
    # FunASR logs on the root logger, so the root's level is raised; ours keeps the level it
    # had through the root.
    ours.setLevel(ours.getEffectiveLevel())
    root.setLevel(max(root_level, logging.ERROR))
    try:
        with contextlib.redirect_stdout(held), contextlib.redirect_stderr(held):
            yield
    finally:
        held.holding = False
        root.setLevel(root_level)
        ours.setLevel(our_level)
        _quiet_loggers()  # jieba and modelscope set their levels when imported, just now


def _quiet_loggers() -> None:
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def quiet_libraries(verbose: bool = False) -> Iterator[None]:
    """For one command: log records of the model libraries below ERROR and Python warnings
    raised from their modules are not shown (``verbose`` shows them). Restored afterwards,
    for callers that run the CLI in their own process."""
    loggers = {name: logging.getLogger(name) for name in LIBRARIES}
    levels = {name: logger.level for name, logger in loggers.items()}
    with warnings.catch_warnings():
        if not verbose:
            _quiet_loggers()
            warnings.filterwarnings("ignore", module=_LIBRARY_MODULES)
        try:
            yield
        finally:
            for name, logger in loggers.items():
                logger.setLevel(levels[name])

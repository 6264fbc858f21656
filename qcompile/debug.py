"""Logging under the `qoq` logger and the debug dump: each pass's graph before and after, as Python
source, in a folder named by the `debug_dir` option or the `QOQ_DEBUG_DIR` environment variable.

Layout: `<dir>/graph_<id>/<NN>_<pass>.before.py`, `.after.py`, and `final.py`; `QOQ_LOG=debug|info`
sends the `qoq` logger to stderr (libraries add no handlers of their own otherwise).
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from pathlib import Path
from typing import Iterator, Optional

import torch.fx as fx

log = logging.getLogger("qoq")
_HANDLER: Optional[logging.Handler] = None


def configure_logging(level: int | str | None = None) -> None:
    """Send the `qoq` logger to stderr at `level` (default: QOQ_LOG, else WARNING); repeat calls only change the level."""
    global _HANDLER
    if level is None:
        level = os.environ.get("QOQ_LOG") or logging.WARNING
    if isinstance(level, str):
        number = logging.getLevelName(level.upper())  # a name -> its number (3.10 has no mapping getter)
        if not isinstance(number, int):
            raise ValueError(f"QOQ_LOG={level!r}: expected one of debug, info, warning, error")
        level = number
    if _HANDLER is None:
        _HANDLER = logging.StreamHandler()
        _HANDLER.setFormatter(logging.Formatter("[qoq %(levelname)s] %(message)s"))
        log.addHandler(_HANDLER)
    log.setLevel(level)


if os.environ.get("QOQ_LOG"):
    configure_logging()


def debug_dir(config=None) -> Optional[Path]:
    """Where to dump graphs: the `debug_dir` option, else QOQ_DEBUG_DIR, else None (no dump)."""
    folder = getattr(config, "debug_dir", None) or os.environ.get("QOQ_DEBUG_DIR")
    return Path(folder) if folder else None


def graph_source(gm: fx.GraphModule) -> str:
    """The graph as Python, from the graph itself (the module's `.code` lags until `recompile()`)."""
    try:
        return gm.graph.python_code("self").src
    except Exception as exc:  # a graph half-way through a rewrite may not print as code
        return f"# python_code failed ({type(exc).__name__}: {exc}); the node table:\n" + "\n".join(
            f"# {n.format_node()}" for n in gm.graph.nodes)


class GraphDumper:
    """Writes one graph's stages to `<dir>/graph_<id>/`; does nothing when no folder is set."""

    def __init__(self, folder: Optional[Path], graph_id: int):
        self.folder = None if folder is None else Path(folder) / f"graph_{graph_id}"
        self.graph_id = graph_id
        self.step = 0
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            log.info("qoq: dumping graph %d's passes to %s", graph_id, self.folder)

    def write(self, name: str, gm: fx.GraphModule) -> None:
        if self.folder is None:
            return
        safe = re.sub(r"[^0-9A-Za-z_.-]", "_", name)
        (self.folder / f"{safe}.py").write_text(graph_source(gm))

    @contextlib.contextmanager
    def stage(self, name: str, gm: fx.GraphModule) -> Iterator[None]:
        """Around one pass: dump before and after, log its time, and tag an escaping error with the pass name."""
        self.step += 1
        stem = f"{self.step:02d}_{name}"
        self.write(f"{stem}.before", gm)
        start = time.perf_counter()
        try:
            yield
        except Exception as exc:
            if getattr(exc, "qoq_pass", None) is None:
                try:
                    exc.qoq_pass = name
                except AttributeError:  # exceptions with __slots__ cannot take the tag
                    pass
            self.write(f"{stem}.failed", gm)
            raise
        log.debug("qoq graph %d: pass %s took %.3f s", self.graph_id, name, time.perf_counter() - start)
        self.write(f"{stem}.after", gm)


_CURRENT: Optional[GraphDumper] = None


@contextlib.contextmanager
def dumping(dumper: GraphDumper) -> Iterator[GraphDumper]:
    """Make `dumper` the one `pass_stage` uses while one graph compiles."""
    global _CURRENT
    previous, _CURRENT = _CURRENT, dumper
    try:
        yield dumper
    finally:
        _CURRENT = previous


def pass_stage(name: str, gm: fx.GraphModule):
    """For the pass manager: `with pass_stage("smooth", qgraph.gm): ...`; a no-op dump outside a compile."""
    return (_CURRENT or GraphDumper(None, -1)).stage(name, gm)

"""Figures for the command line (matplotlib, a dependency of tuco-peft)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from ..errors import InputError
from ..io.locking import WRITER, WRITTEN_BY, replaced_atomically
from ..io.results import ResultRow
from .statistics import mean_per_layer

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# The formats whose metadata matplotlib writes, and the key that marks a figure as tuco-peft's (so that a
# rerun may overwrite it, and a file it did not write is not).
_MARKED_FORMATS = {"png": "Software", "pdf": "Creator", "svg": "Creator", "eps": "Creator", "ps": "Creator"}
FIGURE_MARK = WRITER.encode()


def pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("--plot needs matplotlib, a dependency of tuco-peft: pip install 'matplotlib>=3.8'.") from None
    return plt


def _plot_format(path: str | Path) -> str:
    return Path(path).suffix.lower().removeprefix(".")


def check_plot_path(path: str | Path) -> None:
    """Refuse a file type the figure cannot be written in, with its mark, before any analysis runs."""
    pyplot()
    if _plot_format(path) not in _MARKED_FORMATS:
        raise InputError(
            f"--plot {path} must end in one of {', '.join('.' + name for name in sorted(_MARKED_FORMATS))} (e.g. .png)."
        )


def _histogram(axis, groups: Mapping[str, Sequence[ResultRow]]) -> None:
    from matplotlib.ticker import MaxNLocator

    bins = [i / 40 for i in range(41)]
    for name, rows in groups.items():
        axis.hist([row.tuco for row in rows], bins=bins, alpha=0.6, label=f"{name} (n={len(rows)})")
    axis.set_xlabel("TuCo at the last prompt token")
    axis.set_ylabel("prompts")
    axis.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts: no tick at 2.5 prompts
    axis.set_xlim(0, 1)
    axis.legend()


def analysis_figure(groups: Mapping[str, Sequence[ResultRow]], title: str = "") -> Figure:
    """The figure ``plot_analysis`` writes, to show or change first (close it with ``plt.close`` when done)."""
    plt = pyplot()
    figure, (profile, histogram) = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in groups.items():
        layers = range(len(rows[0].ptc_l1))
        prefix = f"{name}: " if len(groups) > 1 else ""
        profile.plot(layers, mean_per_layer(rows, "ptc_l1"), marker="o", label=f"{prefix}‖PTC_l‖₁")
        profile.plot(layers, mean_per_layer(rows, "ftc_l1"), marker="s", linestyle="--", label=f"{prefix}‖FTC_l‖₁")
    profile.set_xticks(list(layers))
    profile.set_xlabel("layer (decoder block)")
    profile.set_ylabel("mean L1 norm at the last token")
    profile.legend()
    _histogram(histogram, groups)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return figure


def plot_analysis(groups: Mapping[str, Sequence[ResultRow]], path: str | Path, title: str = "") -> Path:
    """Per-layer mean ‖PTC_l‖₁ and ‖FTC_l‖₁ of each group (left) and the TuCo histograms (right), as a PNG."""
    return write_figure(analysis_figure(groups, title), path)


def save_figure(figure: Figure, target: str | Path | BinaryIO, file_format: str) -> None:
    """``figure`` in ``file_format``, carrying tuco-peft's mark (so that a rerun may overwrite it)."""
    figure.savefig(target, dpi=120, format=file_format, metadata={_MARKED_FORMATS[file_format]: WRITTEN_BY})


def write_figure(figure: Figure, path: str | Path) -> Path:
    """Write ``figure`` in the format its suffix names, in one rename (a failure leaves the old file), and
    close it."""
    path = Path(path)
    try:
        with replaced_atomically(path) as staging:
            save_figure(figure, staging, _plot_format(path))
    finally:
        pyplot().close(figure)
    return path

"""How every figure looks: one fixed colour and position per backend, value labels on bars, PNG + SVG output."""

from __future__ import annotations

from pathlib import Path

try:
    import matplotlib
except ModuleNotFoundError as e:
    raise ModuleNotFoundError(
        "the report draws with matplotlib: pip install -e '.[dev]' (or: pip install matplotlib)"
    ) from e

matplotlib.use("Agg")  # files only: no display on CI or the GPU host

import matplotlib.pyplot as plt  # noqa: E402

# Okabe-Ito colours (distinguishable with colour-blindness); the reference is neutral grey so the others stand out.
BACKEND_COLOURS = {
    "torch": "#6e6e6e",
    "torch_compile": "#0072B2",
    "liger": "#E69F00",
    "unsloth": "#009E73",
    "chronicals": "#D55E00",
}
# Backends outside the five still get a stable colour: assigned from these by sorted name.
SPARE_COLOURS = ("#CC79A7", "#56B4E9", "#F0E442", "#000000")
BACKEND_LABELS = {
    "torch": "PyTorch/HF (eager)",
    "torch_compile": "PyTorch/HF + torch.compile",
    "liger": "Liger-Kernel",
    "unsloth": "Unsloth",
    "chronicals": "Chronicals",
}
REFERENCE_BACKEND = "torch"
GAIN, LOSS = "#009E73", "#D55E00"

plt.rcParams.update(
    {
        "figure.dpi": 110,
        "savefig.dpi": 150,
        "font.size": 9,
        "axes.titlesize": 10,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.grid": True,
        "axes.grid.axis": "y",
        "grid.alpha": 0.3,
        "svg.fonttype": "none",  # text stays text in SVG
        "svg.hashsalt": "chronicals",  # stable element ids: re-rendering the same rows gives the same SVG
    }
)


def backend_order(names) -> list[str]:
    """The five known backends in a fixed order (reference first, Chronicals last), then any others by name."""
    names = set(names)
    known = [b for b in BACKEND_COLOURS if b in names]
    return known + sorted(names - set(known))


def colour(backend: str, all_backends=()) -> str:
    if backend in BACKEND_COLOURS:
        return BACKEND_COLOURS[backend]
    others = sorted(set(all_backends) - set(BACKEND_COLOURS) | {backend})
    return SPARE_COLOURS[others.index(backend) % len(SPARE_COLOURS)]


def label(backend: str) -> str:
    return BACKEND_LABELS.get(backend, backend)


def short_number(x: float) -> str:
    """A bar label that fits above a narrow bar: 12345 -> '12.3k', 0.8123 -> '0.812'."""
    if abs(x) >= 1e6:
        return f"{x / 1e6:.2f}M"
    if abs(x) >= 1e4:
        return f"{x / 1e3:.1f}k"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.3g}"


def label_bars(ax, bars, texts) -> None:
    for bar, text in zip(bars, texts):
        ax.annotate(
            text,
            (bar.get_x() + bar.get_width() / 2, bar.get_height() + bar.get_y()),
            xytext=(0, 2),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=7,
        )


def save(fig, out_dir: Path, name: str) -> list[Path]:
    """Write the figure as PNG (for viewing) and SVG (for the paper), then free it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.svg"]
    fig.tight_layout()
    for path in paths:
        # No creation date in the files, so a re-render of unchanged results leaves reports/ unchanged in git.
        metadata = {"Date": None} if path.suffix == ".svg" else {"Software": None}
        fig.savefig(path, bbox_inches="tight", metadata=metadata)
    plt.close(fig)
    return paths

"""Matplotlib plots of a mohdify.flow.Flow (matplotlib is imported only here, only when plotting)."""

from __future__ import annotations

from pathlib import Path

import torch


def _plt():
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(f"{e}: Flow.plot needs matplotlib (pip install 'mohdify[research]').") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _labels(flow) -> list[str]:
    return [n.replace("model.", "").replace("encoder.", "").replace("layers.", "L").replace("layer.", "L")
            for n in flow.branches]


def _heatmap(plt, path: Path, data: torch.Tensor, labels: list[str], xlabel: str, title: str, cmap: str,
             width: float, bar: float, vrange: tuple = (None, None)) -> Path:
    """One branches x columns heat map of `data` `[B, C]`, saved to `path`."""
    fig, ax = plt.subplots(figsize=(width, 0.25 * len(labels) + 1.5), dpi=90)
    im = ax.imshow(data.numpy(), aspect="auto", cmap=cmap, vmin=vrange[0], vmax=vrange[1], interpolation="nearest")
    ax.set_yticks(range(len(labels)), labels, fontsize=6)
    ax.set_xlabel(xlabel)
    ax.set_title(title.strip(), fontsize=9)
    fig.colorbar(im, ax=ax, fraction=bar)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_flow(flow, folder: Path, title: str = "") -> list[Path]:
    plt = _plt()
    folder.mkdir(parents=True, exist_ok=True)
    labels = _labels(flow)
    nb, d = flow.energy.shape
    paths = []

    share = flow.energy / flow.energy.sum(1, keepdim=True).clamp_min(1e-30)          # [B, D]
    paths.append(_heatmap(plt, folder / "flow_heatmap.png", torch.log10(share.clamp_min(1e-6)), labels,
                          "hidden dim", f"{title} share of input energy per dim (log10)", "magma", 8, 0.03))

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), dpi=90)
    cmap = plt.get_cmap("viridis")
    for ax, values, what in ((axes[0], flow.energy, "dims"), (axes[1], flow.group_energy, "groups")):
        ordered = values.sort(dim=1, descending=True).values
        cum = ordered.cumsum(1) / ordered.sum(1, keepdim=True).clamp_min(1e-30)
        x = torch.arange(1, values.shape[1] + 1) / values.shape[1]
        for i in range(nb):
            ax.plot(x.numpy(), cum[i].numpy(), color=cmap(i / max(1, nb - 1)), lw=1)
        ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="uniform")
        ax.set_xlabel(f"fraction of {what} (largest first)"), ax.set_ylabel("share of energy")
        ax.set_title(f"concentration over {what} (color: depth)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    paths.append(folder / "flow_concentration.png")
    fig.savefig(paths[-1])
    plt.close(fig)

    paths.append(_heatmap(plt, folder / "flow_frequency.png", flow.frequency, labels, "hidden dim",
                          f"{title} share of tokens with the dim in their top {flow.top_fraction:.0%}", "viridis", 8,
                          0.03, vrange=(0, 1)))
    if flow.load is not None:
        paths.append(_heatmap(plt, folder / "flow_load.png", flow.load, labels, "group",
                              f"{title} group load (share of tokens)", "Blues", 6, 0.04, vrange=(0, 1)))
    return paths

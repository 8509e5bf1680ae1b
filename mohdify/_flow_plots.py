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


def plot_flow(flow, folder: Path, title: str = "") -> list[Path]:
    plt = _plt()
    folder.mkdir(parents=True, exist_ok=True)
    labels = _labels(flow)
    nb, d = flow.energy.shape
    paths = []

    share = flow.energy / flow.energy.sum(1, keepdim=True).clamp_min(1e-30)          # [B, D]
    fig, ax = plt.subplots(figsize=(8, 0.25 * nb + 1.5), dpi=90)
    im = ax.imshow(torch.log10(share.clamp_min(1e-6)).numpy(), aspect="auto", cmap="magma", interpolation="nearest")
    ax.set_yticks(range(nb), labels, fontsize=6)
    ax.set_xlabel("hidden dim")
    ax.set_title(f"{title} share of input energy per dim (log10)".strip(), fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    paths.append(folder / "flow_heatmap.png")
    fig.savefig(paths[-1])
    plt.close(fig)

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

    fig, ax = plt.subplots(figsize=(8, 0.25 * nb + 1.5), dpi=90)
    im = ax.imshow(flow.frequency.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks(range(nb), labels, fontsize=6)
    ax.set_xlabel("hidden dim")
    ax.set_title(f"{title} share of tokens with the dim in their top {flow.top_fraction:.0%}".strip(), fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    paths.append(folder / "flow_frequency.png")
    fig.savefig(paths[-1])
    plt.close(fig)

    if flow.load is not None:
        fig, ax = plt.subplots(figsize=(6, 0.25 * nb + 1.5), dpi=90)
        im = ax.imshow(flow.load.numpy(), aspect="auto", cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
        ax.set_yticks(range(nb), labels, fontsize=6)
        ax.set_xlabel("group")
        ax.set_title(f"{title} group load (share of tokens)".strip(), fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.04)
        fig.tight_layout()
        paths.append(folder / "flow_load.png")
        fig.savefig(paths[-1])
        plt.close(fig)
    return paths

"""The README picture: where the inner weights live in a TinT, and how its one forward pass runs
the inner forward, the backward, the descent and the forward of the updated layers."""

from __future__ import annotations

from pathlib import Path


def draw_tint(path: str | Path, n_prefixes: int = 4, rows_per_prefix: int = 3) -> Path:
    """Draw the diagram into the PNG ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, Rectangle

    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 6.2), gridspec_kw={"width_ratios": [1.05, 1]})
    for ax in (left, right):
        ax.set_axis_off()

    # ---- left: the sequence TinT reads
    left.set_xlim(0, 12)
    left.set_ylim(-0.6, 9.8)
    left.set_title("one TinT sequence: prefix tokens hold the inner weights", fontsize=11)
    colors = ["#c6dbef", "#9ecae1", "#6baed6", "#4292c6"]
    for j in range(n_prefixes):
        x = 0.3 + j * 1.25
        for h in range(rows_per_prefix):
            left.add_patch(Rectangle((x, 6.2 + h * 0.9), 1.05, 0.8, color=colors[j % 4], ec="black", lw=0.6))
            left.text(x + 0.52, 6.6 + h * 0.9, f"W[{j * rows_per_prefix + h}]", ha="center", va="center", fontsize=7)
        left.text(x + 0.52, 5.8, f"prefix {j}", ha="center", fontsize=7.5)
    left.text(2.8, 9.2, "bank of one weight W (dout x din): prefix j stores rows j*r .. j*r+r-1\n"
                        "(r = dout / P rows of din numbers: TinT hidden >= r * din)", ha="center", fontsize=8)
    left.text(6.0, 7.4, "...\none bank of P prefix\ntokens per linear\nweight (q k v o gate\nup down) per layer",
              fontsize=7.5, va="center")
    slots = ["h", "x1", "q,k (rot.)", "v", "o", "h2", "x2", "g, u", "m", "grad"]
    for i in range(6):
        x = 0.3 + i * 1.9
        train = i < 4
        for s, name in enumerate(slots):
            left.add_patch(Rectangle((x, 0.1 + s * 0.48), 1.6, 0.44, color="#fdd0a2" if train else "#c7e9c0",
                                     ec="black", lw=0.4))
            left.text(x + 0.8, 0.32 + s * 0.48, name, ha="center", va="center", fontsize=6)
        left.text(x + 0.8, 5.05, f"token {i}\n{'training' if train else 'test'} part", ha="center", fontsize=7.5)
    left.text(6.0, -0.45, "input tokens: inner hidden state + memory slots kept for the backward and descent",
              ha="center", fontsize=8)
    arrow = dict(arrowstyle="<->", color="black", lw=1.0, mutation_scale=10)
    left.add_patch(FancyArrowPatch((1.1, 5.05 + 0.55), (1.6, 5.75), **arrow))
    left.text(0.1, 5.45, "linear attention\nx_t . W[row] -> e_j", fontsize=6.5, color="#08519c")

    # ---- right: the stages of one forward pass
    right.set_xlim(0, 10)
    right.set_ylim(0, 10)
    right.set_title("one forward pass = forward, backward, descent, forward", fontsize=11)
    stages = [
        ("forward, all layers", "tokens query prefixes (key W rows, value prefix id): y = W x\n"
         "RMSNorm / SwiGLU token-wise; softmax attention with rotary among tokens\nactivations kept in memory slots",
         "#fdd0a2"),
        ("loss gradient", "E (softmax - next token) at the loss positions of the training part\n"
         "(next token's output embedding fetched by a one-ahead attention)", "#fcbba1"),
        ("backward, top k layers", "tokens query prefixes with dy (key prefix id, value W rows): dx = W^T dy\n"
         "norm and gate: N (f(x + g/N) - f(x));  attention: dV = A^T dO (scores stopped)", "#fc9272"),
        ("descent, top k layers", "prefixes query the TRAINING tokens (key dy, value x):\n"
         "W <- W - lr sum_t dy_t x_t^T, written into the prefix embeddings (test tokens masked)", "#9ecae1"),
        ("forward, updated top k layers", "from the stored input of layer L-k, with the new prefix weights\n"
         "-> logits of the test part", "#c7e9c0"),
    ]
    for i, (name, text, color) in enumerate(stages):
        y = 8.3 - i * 1.95
        right.add_patch(Rectangle((0.2, y), 9.6, 1.55, color=color, ec="black", lw=0.7))
        right.text(0.4, y + 1.2, f"{i + 1}. {name}", fontsize=9.5, weight="bold", va="center")
        right.text(0.4, y + 0.55, text, fontsize=7.6, va="center")
        if i:
            right.add_patch(FancyArrowPatch((5, y + 1.95), (5, y + 1.57), arrowstyle="-|>", mutation_scale=12))
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

"""Draw the course's explanatory figures into ``images/`` (matplotlib only; no network, no model, no GPU).

Re-run from the repository root whenever a figure needs to change::

    .venv/bin/python tools/make_figures.py            # all four figures
    .venv/bin/python tools/make_figures.py lora       # only images/lora.png (names: see FIGURES)
    .venv/bin/python tools/make_figures.py --out /tmp/figs   # somewhere else

Figures written (about 1500-1600 px wide, 150 dpi, white background):

* ``data_flow.png``        -- the course pipeline, notebook by notebook (02 download ... 06 reload & chat)
* ``label_mask.png``       -- which tokens of a conversation are training targets (docs/design.md §2.5)
* ``original_vs_fixed.png`` -- role markers as text vs by id, and padding to 512 vs to the batch's longest
* ``lora.png``             -- W + (alpha/r) * B A, with ChatGLM3-6B's numbers

The output is deterministic.  Chinese token pieces need a CJK font (e.g. ``apt-get install fonts-noto-cjk``);
without one the script draws English stand-ins instead and says so.  Set ``GLMLORA_FIG_NO_CJK=1`` to force
the English version.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import font_manager  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle  # noqa: E402

OUT_DIR = Path(__file__).resolve().parent.parent / "images"
DPI = 150

# One palette for every figure.
INK = "#212121"
MUTED = "#616161"
GREY_FILL, GREY_EDGE = "#E6E6E6", "#9E9E9E"
GREEN_FILL, GREEN_EDGE, GREEN_INK = "#C8E6C9", "#43A047", "#1B5E20"
BLUE_FILL, BLUE_EDGE, BLUE_INK = "#DCEBFA", "#1E88E5", "#0D47A1"
ORANGE_FILL, ORANGE_EDGE, ORANGE_INK = "#FFE6C7", "#FB8C00", "#B34700"
RED_INK = "#C62828"
PURPLE_FILL, PURPLE_EDGE = "#EDE3F6", "#8E5CC2"
ARTIFACT_FILL, ARTIFACT_EDGE = "#F5F5F5", "#757575"

SANS = ["DejaVu Sans"]
MONO = ["DejaVu Sans Mono"]

_CJK_NAMES = (
    "Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "Source Han Sans CN", "WenQuanYi Zen Hei",
    "WenQuanYi Micro Hei", "Sarasa Gothic SC", "SimHei", "Microsoft YaHei", "PingFang SC", "Heiti SC",
    "Hiragino Sans GB", "Noto Sans CJK JP", "Noto Sans CJK TC", "Arial Unicode MS", "Droid Sans Fallback",
    "AR PL UMing CN", "AR PL UKai CN",
)
_CJK_FILE_HINTS = ("cjk", "wqy", "wenquanyi", "simhei", "msyh", "sourcehan", "droidsansfallback", "uming",
                   "ukai", "notosanssc", "sarasa", "pingfang", "hiragino")


def find_cjk_font() -> str | None:
    """The family name of an installed font that renders Chinese, or None.

    matplotlib's font cache may predate a font installed later, so font files that look like CJK fonts are
    registered directly before giving up.
    """
    if os.environ.get("GLMLORA_FIG_NO_CJK"):
        return None

    def known() -> str | None:
        names = {f.name for f in font_manager.fontManager.ttflist}
        return next((n for n in _CJK_NAMES if n in names), None)

    name = known()
    if name:
        return name
    for path in sorted(font_manager.findSystemFonts()):
        if any(h in os.path.basename(path).lower() for h in _CJK_FILE_HINTS):
            try:
                font_manager.fontManager.addfont(path)
            except Exception:  # an unreadable font file is simply skipped
                pass
    return known()


def setup_fonts() -> bool:
    """Configure matplotlib; returns True when Chinese text can be drawn."""
    cjk = find_cjk_font()
    if cjk:
        SANS.append(cjk)
        MONO.append(cjk)
    plt.rcParams.update({
        "font.family": SANS,
        "font.size": 10,
        "figure.facecolor": "white",
        "axes.facecolor": "white",
        "savefig.facecolor": "white",
        "axes.unicode_minus": True,
    })
    return cjk is not None


# ----------------------------------------------------------------------------------------------- helpers

def heading(ax, x: float, y: float, text: str, ha: str = "left") -> None:
    """A figure's title line."""
    ax.text(x, y, text, ha=ha, va="center", fontsize=14, fontweight="bold", color=INK)


def canvas(width_in: float, height_in: float):
    """A figure whose single axes is measured in inches from the bottom-left corner."""
    fig = plt.figure(figsize=(width_in, height_in), dpi=DPI)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width_in)
    ax.set_ylim(0, height_in)
    ax.set_axis_off()
    return fig, ax


def save(fig, name: str) -> Path:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / name
    fig.savefig(path, dpi=DPI, metadata={"Software": None})
    plt.close(fig)
    return path


def rbox(ax, x, y, w, h, fill, edge, lw=1.4, pad=0.04, rounding=0.08, ls="-", z=2):
    patch = FancyBboxPatch((x, y), w, h, boxstyle=f"round,pad={pad},rounding_size={rounding}",
                           facecolor=fill, edgecolor=edge, linewidth=lw, linestyle=ls, zorder=z)
    ax.add_patch(patch)
    return patch


def arrow(ax, start, end, color=MUTED, lw=1.8, style="-|>", rad=0.0, z=3, ms=14):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=ms, color=color, lw=lw,
                                 connectionstyle=f"arc3,rad={rad}", zorder=z, shrinkA=0, shrinkB=0))


def badge(ax, x, y, text, color, r=0.17):
    ax.add_patch(plt.Circle((x, y), r, facecolor=color, edgecolor="white", linewidth=1.5, zorder=6))
    ax.text(x, y, text, ha="center", va="center", color="white", fontsize=8.5, fontweight="bold", zorder=7)


# ----------------------------------------------------------------------------------------------- data_flow

def fig_data_flow(cjk: bool) -> Path:
    W, H = 10.7, 5.9
    fig, ax = canvas(W, H)
    heading(ax, 0.25, H - 0.33, "The glmlora pipeline: from the ModelScope download to a chatting counselor")

    def node(x, y, w, h, title, body, nb, kind):
        fill, edge, ink = {
            "step": (BLUE_FILL, BLUE_EDGE, BLUE_INK),
            "disk": (ARTIFACT_FILL, ARTIFACT_EDGE, INK),
            "data": (ORANGE_FILL, ORANGE_EDGE, ORANGE_INK),
            "lora": (GREEN_FILL, GREEN_EDGE, GREEN_INK),
        }[kind]
        rbox(ax, x, y, w, h, fill, edge, ls="--" if kind == "disk" else "-")
        ax.text(x + w / 2, y + h - 0.2, title, ha="center", va="center", fontsize=9.8, fontweight="bold",
                color=ink, zorder=5)
        ax.text(x + w / 2, (y + y + h - 0.38) / 2, body, ha="center", va="center", fontsize=7.9, color=INK,
                zorder=5, linespacing=1.35)
        if nb:
            badge(ax, x + 0.02, y + h + 0.02, nb, edge)
        return (x, y, w, h)

    def right(b, y=None):
        return (b[0] + b[2] + 0.07, b[1] + b[3] / 2 if y is None else y)

    def left(b, y=None):
        return (b[0] - 0.07, b[1] + b[3] / 2 if y is None else y)

    bw, gap = 1.52, 0.25
    xs = [0.25 + i * (bw + gap) for i in range(6)]
    top_y, top_h = 3.1, 1.75
    bot_y, bot_h = 0.62, 1.5

    a = node(xs[0], top_y, bw, top_h, "Download",
             "snapshot_download(\n'ZhipuAI/chatglm3-6b')\n≈ 12.5 GB, original layout:\n"
             "config.json\n(model_type chatglm)\n7 × pytorch_model-*.bin\ntokenizer.model", "02", "step")
    b = node(xs[1], top_y, bw, top_h, "Convert once",
             "fused query_key_value\nsplit by rows into\nq_proj · k_proj · v_proj;\n"
             "keys renamed:\ntransformer.encoder.layers\n→ model.layers", "02", "step")
    c = node(xs[2], top_y, bw, top_h, "Native model dir",
             "GlmForCausalLM\n(model_type glm)\n*.safetensors\ngeneration_config.json\n"
             "stop ids [2, 64795, 64797]", "02", "disk")
    d = node(xs[0], bot_y, bw, bot_h, "Instruction data",
             'records {"system",\n"input", "output"}\ncounselor dialogues\ntrain / val split', "03", "data")
    e = node(xs[1], bot_y, bw, bot_h, "process_func",
             "[gMASK] sop + messages\n(role tokens by id) + eos;\nlabels −100 except\nthe targets", "04",
             "step")
    f = node(xs[2], bot_y, bw, bot_h, "Tensors",
             "input_ids\nlabels (−100 = ignored)\ntruncated to\nthe max length", "04", "data")
    g_y = f[1] + f[3] / 2 - 0.35
    g_top = c[1] + c[3] / 2 + 0.35
    g = node(xs[3], g_y, bw, g_top - g_y, "LoRA training",
             "base model, frozen\n(bf16 where supported)\n\n+ LoRA adapters (peft)\non q_proj, k_proj, v_proj\n"
             "r 8 · α 32\n\nTrainer + a collator\nthat pads to the\nbatch's longest", "05", "lora")
    h_mid = top_y + 0.1
    h = node(xs[4], h_mid - 0.72, bw, 1.44, "Adapter dir",
             "adapter_config.json\nadapter_model.safetensors\n≈ 3.8 M parameters\n(0.06 % of 6.24 B)", "05",
             "disk")
    i = node(xs[5], top_y, bw, top_h, "Reload",
             "native base model\n+ PeftModel\n.from_pretrained(\n    adapter_dir)", "06", "step")
    j = node(xs[5], 1.9, bw, 0.86, "Merge", "merge_and_unload()\nW ← W + (α/r)·B·A", "06", "step")
    k = node(xs[5], bot_y, bw, 0.95, "Chat / export", "stop ids, history,\nchat box;\nsave merged model", "06", "step")

    arrow(ax, right(a), left(b))
    arrow(ax, right(b), left(c))
    arrow(ax, right(d), left(e))
    arrow(ax, right(e), left(f))
    arrow(ax, right(c), left(g, c[1] + c[3] / 2))
    arrow(ax, right(f), left(g, f[1] + f[3] / 2))
    arrow(ax, right(g, h_mid), left(h, h_mid))
    arrow(ax, right(h, i[1] + 0.35), left(i, i[1] + 0.35))
    arrow(ax, (i[0] + bw / 2, i[1] - 0.07), (j[0] + bw / 2, j[1] + j[3] + 0.1))
    arrow(ax, (j[0] + bw / 2, j[1] - 0.07), (k[0] + bw / 2, k[1] + k[3] + 0.1))
    # the same base model is reused at reload time
    ax.annotate("", xy=(i[0] + 0.45, i[1] + i[3] + 0.08), xytext=(c[0] + c[2] - 0.45, c[1] + c[3] + 0.08),
                arrowprops=dict(arrowstyle="-|>", color=ARTIFACT_EDGE, lw=1.3, ls=(0, (4, 3)),
                                connectionstyle="arc3,rad=-0.1", mutation_scale=12), zorder=1)
    ax.text((c[0] + c[2] + i[0]) / 2, c[1] + c[3] + 0.36, "the same base model, reloaded",
            ha="center", va="bottom", fontsize=8.5, color=MUTED, style="italic")
    # legend
    ly = 0.2
    lx = 0.3
    for label, fill, edge, ls in (("a step", BLUE_FILL, BLUE_EDGE, "-"), ("files on disk", ARTIFACT_FILL,
                                  ARTIFACT_EDGE, "--"), ("instruction data", ORANGE_FILL, ORANGE_EDGE, "-"),
                                  ("LoRA", GREEN_FILL, GREEN_EDGE, "-")):
        ax.add_patch(Rectangle((lx, ly - 0.08), 0.26, 0.16, facecolor=fill, edgecolor=edge, ls=ls, lw=1.2))
        ax.text(lx + 0.33, ly, label, va="center", fontsize=8.5, color=INK)
        lx += 0.45 + 0.075 * len(label) + 0.25
    badge(ax, lx + 0.1, ly, "NN", MUTED, r=0.13)
    ax.text(lx + 0.3, ly, "= the notebook that covers it", va="center", fontsize=8.5, color=INK)
    return save(fig, "data_flow.png")


# ----------------------------------------------------------------------------------------------- label_mask

def conversation(cjk: bool) -> list[tuple[str, str | None, bool]]:
    """(piece, owning role or None, is special) for the schematic conversation."""
    zh = {"sys": ["你是", "咨询师"], "u1": ["我", "睡不着"], "a1": ["试试", "深呼吸"], "u2": ["谢谢"],
          "a2": ["不客气"]}
    en = {"sys": ["You are", "a counselor"], "u1": ["I", "can't sleep"], "a1": ["Try", "breathing"],
          "u2": ["Thanks"], "a2": ["Welcome"]}
    t = zh if cjk else en
    out: list[tuple[str, str | None, bool]] = [("[gMASK]", None, True), ("sop", None, True)]

    def msg(role, pieces):
        out.append((f"<|{role}|>", role, True))
        out.append(("\\n", role, False))
        out.extend((p, role, False) for p in pieces)

    msg("system", t["sys"])
    msg("user", t["u1"])
    msg("assistant", t["a1"])
    msg("user", t["u2"])
    msg("assistant", t["a2"])
    out.append(("eos", None, True))
    return out


def targets_of(tokens) -> list[bool]:
    """docs/design.md §2.5: a token is a target when the token just before it belongs to an assistant message."""
    return [i > 0 and tokens[i - 1][1] == "assistant" for i in range(len(tokens))]


def fig_label_mask(cjk: bool) -> Path:
    tokens = conversation(cjk)
    is_target = targets_of(tokens)
    W, H = 10.6, 7.4
    fig, ax = canvas(W, H)
    heading(ax, 0.3, H - 0.35, "Which tokens does the model learn?  input_ids and labels of one conversation")
    rbox(ax, 0.3, H - 1.12, W - 0.6, 0.42, "#F3F8F3", GREEN_EDGE, lw=1.2)
    ax.text(W / 2, H - 0.91, "Rule: a token is a target when the PREVIOUS token belongs to an assistant message",
            ha="center", va="center", fontsize=12, fontweight="bold", color=GREEN_INK)
    # legend
    ly = H - 1.52
    ax.add_patch(Rectangle((0.35, ly - 0.11), 0.3, 0.22, facecolor=GREY_FILL, edgecolor=GREY_EDGE))
    ax.text(0.72, ly, "label −100: prompt / special token, ignored by the loss", va="center", fontsize=9.5)
    ax.add_patch(Rectangle((5.35, ly - 0.11), 0.3, 0.22, facecolor=GREEN_FILL, edgecolor=GREEN_EDGE))
    ax.text(5.72, ly, "target: label = the token's own id (the model shifts by one inside)", va="center",
            fontsize=9.5)

    def width(piece, special):
        per = 0.102 if special else (0.082 if piece.isascii() else 0.17)
        return max(0.48, len(piece) * per + 0.22)

    split = next(n for n, t in enumerate(tokens) if t[1] == "assistant")  # row 2 starts at <|assistant|>
    rows = [range(0, split), range(split, len(tokens))]
    row_y = [H - 2.9, H - 4.95]
    cell_h = 0.55
    centers: dict[int, tuple[float, float]] = {}
    role_color = {"system": PURPLE_EDGE, "user": ORANGE_EDGE, "assistant": GREEN_EDGE}
    role_name = {"system": "system message", "user": "user message", "assistant": "assistant message"}
    for r, idx in enumerate(rows):
        y = row_y[r]
        x = 0.45
        spans: list[list] = []
        for n in idx:
            piece, role, special = tokens[n]
            w = width(piece, special)
            tgt = is_target[n]
            ax.add_patch(Rectangle((x, y), w, cell_h, facecolor=GREEN_FILL if tgt else GREY_FILL,
                                   edgecolor=GREEN_EDGE if tgt else GREY_EDGE, linewidth=1.6 if tgt else 1.0,
                                   zorder=3))
            ax.text(x + w / 2, y + cell_h / 2, piece, ha="center", va="center", zorder=4,
                    fontsize=10.5, family=MONO if special or piece == "\\n" else SANS,
                    fontweight="bold" if special else "normal", color=INK)
            ax.text(x + w / 2, y + cell_h + 0.1, str(n), ha="center", va="bottom", fontsize=7, color=MUTED)
            label = f"= {piece}" if tgt else "−100"
            ax.text(x + w / 2, y - 0.12, label, ha="center", va="top", fontsize=9.2,
                    family=MONO if (special or piece == "\\n" or not tgt) else SANS,
                    color=GREEN_INK if tgt else MUTED, fontweight="bold" if tgt else "normal")
            centers[n] = (x + w / 2, y)
            if spans and spans[-1][0] == role and role is not None and not (special and role):
                spans[-1][2] = x + w
            elif role is not None:
                spans.append([role, x, x + w])
            else:
                spans.append([None, x, x + w])
            x += w + 0.06
        ax.text(0.12, y + cell_h / 2, "input", ha="center", va="center", fontsize=7.5, color=MUTED, rotation=90)
        ax.text(0.12, y - 0.25, "label", ha="center", va="center", fontsize=7.5, color=MUTED, rotation=90)
        # brackets above each message
        for role, x0, x1 in spans:
            if role is None:
                continue
            by = y + cell_h + 0.36
            col = role_color[role]
            ax.plot([x0 + 0.02, x0 + 0.02, x1 - 0.02, x1 - 0.02], [by - 0.07, by, by, by - 0.07], color=col, lw=1.6)
            ax.text((x0 + x1) / 2, by + 0.06, role_name[role], ha="center", va="bottom", fontsize=8.5, color=col,
                    fontweight="bold")
        if r == 0:
            ax.text(x + 0.05, y + cell_h / 2, "…continues ↓", va="center", fontsize=8.5, color=MUTED)

    # row 1: nothing is learned from the prefix, the system or the user message
    y1 = row_y[0] - 0.5
    x_first, x_last = centers[0][0] - 0.2, centers[rows[0][-1]][0] + 0.2
    ax.plot([x_first, x_first, x_last, x_last], [y1 + 0.07, y1, y1, y1 + 0.07], color=MUTED, lw=1.4)
    ax.text((x_first + x_last) / 2, y1 - 0.1, "prefix, system and user tokens are never targets: "
            "the model reads them, it does not learn to write them", ha="center", va="top", fontsize=9.2,
            color=MUTED)

    # row 2: numbered markers under the cells, explained below
    assistant_idx = [n for n, t in enumerate(tokens) if t[0] == "<|assistant|>"]
    nl_idx = [n + 1 for n in assistant_idx]
    after_reply = [n for n in range(1, len(tokens)) if is_target[n] and tokens[n][2]]  # <|user|> and eos
    notes = [
        (assistant_idx, "1", RED_INK, "<|assistant|> itself is NOT a target: the prompt supplies it "
                                      "(the token before it belongs to the user)"),
        (nl_idx, "2", GREEN_INK, "the \\n right after <|assistant|> IS a target (the reply's empty metadata "
                                 "line)"),
        (after_reply, "3", GREEN_INK, "the token after each reply IS a target: <|user|> in the middle, eos at "
                                      "the end — the model learns to stop"),
    ]
    my = row_y[1] - 0.62
    for idx, mark, color, _ in notes:
        for n in idx:
            badge(ax, centers[n][0], my, mark, color, r=0.14)
    ny = my - 0.48
    for _, mark, color, text in notes:
        badge(ax, 0.62, ny, mark, color, r=0.14)
        ax.text(0.88, ny, text, va="center", fontsize=9.6, color=color)
        ny -= 0.37
    if not cjk:
        ax.text(W - 0.3, my - 0.85, "(English stand-ins: no CJK font was found)", ha="right", va="center",
                fontsize=8, color=MUTED, style="italic")

    foot = ("Every assistant turn is trained (multi-turn).  Sequence = [gMASK] sop + messages + eos; "
            "one message = <|role|> + \"\\n\" + content.")
    ax.text(W / 2, 0.25, foot, ha="center", va="center", fontsize=8.8, color=MUTED)
    return save(fig, "label_mask.png")


# ----------------------------------------------------------------------------------------------- original_vs_fixed

def fig_original_vs_fixed(cjk: bool) -> Path:
    W, H = 10.6, 8.25
    fig, ax = canvas(W, H)
    heading(ax, W / 2, H - 0.32, "Two pitfalls of the original tutorial, and what glmlora does instead", "center")
    colx = [0.3, W / 2 + 0.15]
    colw = W / 2 - 0.45
    for x, title, fill, edge, ink in ((colx[0], "original tutorial", ORANGE_FILL, ORANGE_EDGE, ORANGE_INK),
                                      (colx[1], "glmlora", GREEN_FILL, GREEN_EDGE, GREEN_INK)):
        rbox(ax, x, H - 1.0, colw, 0.34, fill, edge, lw=1.4)
        ax.text(x + colw / 2, H - 0.83, title, ha="center", va="center", fontsize=12.5, fontweight="bold",
                color=ink)

    def section(y, text):
        ax.add_patch(Rectangle((0.3, y - 0.17), W - 0.6, 0.34, facecolor="#F2F2F2", edgecolor="none", zorder=1))
        ax.text(0.45, y, text, fontsize=11, fontweight="bold", color=INK, va="center", zorder=2)

    # ---- section 1: role markers
    s1 = H - 1.42
    section(s1, "1 · How a role marker such as <|user|> reaches the model")
    user_text = "我睡不着" if cjk else "I can't sleep"
    code_top, code_h = s1 - 0.35, 0.78
    py = code_top - code_h - 0.95  # bottom of the token cells
    for x, code in ((colx[0], 'prompt = "<|system|>\\n…<|user|>\\n"\n'
                              f'         + "{user_text}" + "<|assistant|>"\n'
                              'tokenizer(prompt)               # simplified'),
                    (colx[1], 'ids = ([tok.role_id("user")]  # 64795\n'
                              '       + tok.encode_text("\\n")\n       + tok.encode_text(text))')):
        rbox(ax, x + 0.05, code_top - code_h, colw - 0.1, code_h - 0.04, "#FAFAFA", "#BDBDBD", lw=1.0,
             rounding=0.05)
        ax.text(x + 0.18, code_top - 0.1, code, va="top", family=MONO, fontsize=8.8, color=INK, linespacing=1.45)
    ax.text(colx[0] + 0.05, py + 0.7, '"<|user|>" written as TEXT is split into ordinary pieces:', fontsize=9.5,
            va="center", color=INK)
    ax.text(colx[1] + 0.05, py + 0.7, "the role token is inserted BY ID:", fontsize=9.5, va="center", color=INK)
    px = colx[0] + 0.3
    for p in ["<", "|", "user", "|", ">"]:
        w = 0.34 if len(p) == 1 else 0.66
        ax.add_patch(Rectangle((px, py), w, 0.42, facecolor=ORANGE_FILL, edgecolor=ORANGE_EDGE, lw=1.3))
        ax.text(px + w / 2, py + 0.21, p, ha="center", va="center", family=MONO, fontsize=11.5, fontweight="bold")
        px += w + 0.07
    ax.text(px + 0.12, py + 0.21, "5 ordinary text tokens", va="center", fontsize=9.5, color=ORANGE_INK)
    px = colx[1] + 0.3
    ax.add_patch(Rectangle((px, py), 1.2, 0.42, facecolor=GREEN_FILL, edgecolor=GREEN_EDGE, lw=1.6))
    ax.text(px + 0.6, py + 0.21, "<|user|>", ha="center", va="center", family=MONO, fontsize=11.5,
            fontweight="bold")
    ax.text(px + 1.35, py + 0.21, "1 special token, id 64795", va="center", fontsize=9.5, color=GREEN_INK,
            fontweight="bold")
    ax.text(colx[0] + 0.05, py - 0.22, "✗ the model never saw a role switch written like this, so\n"
            "   training and chat use a format ChatGLM3 did not learn", va="top", fontsize=9.5, color=RED_INK,
            linespacing=1.35)
    ax.text(colx[1] + 0.05, py - 0.22, "✓ exactly the format ChatGLM3 was trained on; a user who\n"
            '   types "<|user|>" only produces harmless text pieces', va="top", fontsize=9.5,
            color=GREEN_INK, linespacing=1.35)

    # ---- section 2: padding
    s2 = py - 1.05
    section(s2, "2 · Padding a batch of 4 samples with 120, 95, 160 and 140 real tokens")
    for y0, y1 in ((H - 1.08, s1 + 0.22), (s1 - 0.22, s2 + 0.22), (s2 - 0.62, 0.25)):
        ax.plot([W / 2, W / 2], [y0, y1], color="#D0D0D0", lw=1.0)
    lengths = [120, 95, 160, 140]
    real = sum(lengths)
    scale = (colw - 0.75) / 512
    bar_h, bar_gap = 0.3, 0.13
    ly = s2 - 0.42
    lx = W / 2 - 2.3
    ax.add_patch(Rectangle((lx, ly - 0.09), 0.28, 0.18, facecolor=GREEN_FILL, edgecolor=GREEN_EDGE))
    ax.text(lx + 0.36, ly, "real tokens", va="center", fontsize=9)
    lx += 1.55
    ax.add_patch(Rectangle((lx, ly - 0.09), 0.28, 0.18, facecolor="#CFCFCF", edgecolor=GREY_EDGE, hatch="///"))
    ax.text(lx + 0.36, ly, "padding: computed, then ignored", va="center", fontsize=9)

    def bars(x, pad_to):
        top = ly - 0.3
        x0 = x + 0.5
        for n, L in enumerate(lengths):
            y = top - (n + 1) * bar_h - n * bar_gap
            ax.add_patch(Rectangle((x0, y), L * scale, bar_h, facecolor=GREEN_FILL, edgecolor=GREEN_EDGE, lw=1.0))
            ax.add_patch(Rectangle((x0 + L * scale, y), (pad_to - L) * scale, bar_h, facecolor="#CFCFCF",
                                   edgecolor=GREY_EDGE, lw=1.0, hatch="///"))
            if pad_to < 512:
                ax.add_patch(Rectangle((x0 + pad_to * scale, y), (512 - pad_to) * scale, bar_h,
                                       facecolor="none", edgecolor="#BDBDBD", lw=0.8, ls=(0, (3, 3))))
            ax.text(x0 - 0.08, y + bar_h / 2, str(L), ha="right", va="center", fontsize=9, color=INK)
        base_y = top - 4 * bar_h - 3 * bar_gap
        ax.plot([x0, x0 + 512 * scale], [base_y - 0.05, base_y - 0.05], color=MUTED, lw=0.8)
        for tick in (0, 128, 256, 384, 512):
            tx = x0 + tick * scale
            ax.plot([tx, tx], [base_y - 0.05, base_y - 0.1], color=MUTED, lw=0.8)
            ax.text(tx, base_y - 0.14, str(tick), ha="center", va="top", fontsize=8, color=MUTED)
        ax.text(x0 + 256 * scale, base_y - 0.4, "tokens per sample", ha="center", va="top", fontsize=8.5,
                color=MUTED)
        return base_y - 0.75

    note_y = bars(colx[0], 512)
    total = 4 * 512
    ax.text(colx[0] + 0.05, note_y,
            f"✗ every sample padded to 512: {real} real of {total:,} tokens\n"
            f"   = {100 * real / total:.0f} % real; {100 * (1 - real / total):.0f} % of the compute goes to padding",
            va="top", fontsize=9.5, color=RED_INK, linespacing=1.35)
    bars(colx[1], 160)
    total = 4 * 160
    ax.text(colx[1] + 0.05, note_y,
            f"✓ padded to the batch's longest (160; a multiple of 8):\n   {real} real of {total} tokens = "
            f"{100 * real / total:.0f} % real; dashed = no longer computed",
            va="top", fontsize=9.5, color=GREEN_INK, linespacing=1.35)
    return save(fig, "original_vs_fixed.png")


# ----------------------------------------------------------------------------------------------- lora

def fig_lora(cjk: bool) -> Path:
    W, H = 10.6, 7.45
    fig, ax = canvas(W, H)
    heading(ax, W / 2, H - 0.35, "LoRA: keep W frozen, learn a small low-rank update", "center")
    ax.text(W / 2, H - 0.82, "h  =  W x  +  (α / r) · B A x", ha="center", va="center", fontsize=15,
            family=MONO, color=INK)
    slate, slate_ink = "#5F6B7A", "#37474F"

    # matrices (r is drawn far wider than to scale, or B and A would be invisible)
    S, top = 2.2, H - 1.75
    wx, wy = 0.55, top - S
    ax.add_patch(Rectangle((wx, wy), S, S, facecolor="#DADDE3", edgecolor=slate, lw=1.8))
    ax.text(wx + S / 2, wy + S / 2 + 0.22, "W", ha="center", va="center", fontsize=26, fontweight="bold",
            color=slate_ink)
    ax.text(wx + S / 2, wy + S / 2 - 0.32, "frozen", ha="center", va="center", fontsize=11, color=slate_ink)
    ax.text(wx + S + 0.27, wy + S / 2, "+", ha="center", va="center", fontsize=24, color=INK)
    ax.text(wx + S + 0.98, wy + S / 2, "α / r ×", ha="center", va="center", fontsize=13, color=INK,
            family=MONO)
    bx, thin = wx + S + 1.62, 0.34
    ax.add_patch(Rectangle((bx, wy), thin, S, facecolor=GREEN_FILL, edgecolor=GREEN_EDGE, lw=1.8))
    ax.text(bx + thin / 2, wy + S / 2, "B", ha="center", va="center", fontsize=18, fontweight="bold",
            color=GREEN_INK)
    ax.text(bx + thin + 0.25, wy + S / 2, "·", ha="center", va="center", fontsize=24, color=INK)
    ax_x = bx + thin + 0.5
    ax.add_patch(Rectangle((ax_x, top - thin), S, thin, facecolor=GREEN_FILL, edgecolor=GREEN_EDGE, lw=1.8))
    ax.text(ax_x + S / 2, top - thin / 2, "A", ha="center", va="center", fontsize=18, fontweight="bold",
            color=GREEN_INK)

    def dims(x, y, shape, numbers):
        ax.text(x, y, shape, ha="center", va="top", fontsize=10.5, family=MONO, color=INK)
        ax.text(x, y - 0.3, numbers, ha="center", va="top", fontsize=9.5, color=MUTED, linespacing=1.3)

    dims(wx + S / 2, wy - 0.12, "d × d", "q_proj: 4096 × 4096\n= 16,777,216 weights")
    dims(bx + thin / 2, wy - 0.12, "d × r", "4096 × 8\n= 32,768\nstarts at 0")
    dims(ax_x + S / 2, top - thin - 0.12, "r × d", "8 × 4096 = 32,768\nrandom start")
    ax.text(ax_x + S / 2, wy + 0.38, "B · A has W's shape (d × d),\nbut rank ≤ r: 2 · d · r numbers.\n"
            "B = 0 at the start: training\nbegins from the base model", ha="center", va="center", fontsize=9.5,
            color=GREEN_INK, linespacing=1.3)
    for x0, x1, text, color, ink in ((wx, wx + S, "from the base model", slate, slate_ink),
                                     (bx, ax_x + S, "trainable", GREEN_EDGE, GREEN_INK)):
        ax.plot([x0, x0, x1, x1], [top + 0.12, top + 0.22, top + 0.22, top + 0.12], color=color, lw=1.6)
        ax.text((x0 + x1) / 2, top + 0.3, text, ha="center", va="bottom", fontsize=10.5, color=ink,
                fontweight="bold")

    # numbers panel
    px = ax_x + S + 0.4
    py = wy - 0.4
    pw, ph = W - 0.35 - px, top + 0.45 - py
    rbox(ax, px, py, pw, ph, "#F6FAF6", GREEN_EDGE, lw=1.2)
    lines = [
        ("ChatGLM3-6B q_proj, r = 8:", INK, "bold", SANS),
        ("trainable  65,536", GREEN_INK, "bold", MONO),
        ("frozen     16.8 M", slate_ink, "bold", MONO),
        ("→ 0.39 % of the layer", MUTED, "normal", SANS),
        ("", INK, "normal", SANS),
        ("scale α / r = 32 / 8 = 4", INK, "normal", SANS),
        ("(the course's default)", MUTED, "normal", SANS),
        ("", INK, "normal", SANS),
        ("q, k, v in all 28 layers:", INK, "normal", SANS),
        ("≈ 3.8 M trainable of 6.24 B", GREEN_INK, "bold", SANS),
        ("(0.06 %)", GREEN_INK, "normal", SANS),
    ]
    ty = py + ph - 0.28
    for text, color, weight, family in lines:
        ax.text(px + 0.18, ty, text, va="center", fontsize=9.6, color=color, fontweight=weight, family=family)
        ty -= 0.245

    # fused query_key_value -> q_proj / k_proj / v_proj
    hy = wy - 1.35
    ax.plot([0.4, W - 0.4], [hy + 0.3, hy + 0.3], color="#D0D0D0", lw=1.0)
    ax.text(0.55, hy, "Where LoRA goes on the native GlmForCausalLM: the original fused query_key_value "
            "is three layers", fontsize=10.5, color=INK, va="center", fontweight="bold")
    sx, sw, sh = 0.55, W - 1.1, 0.36
    sy = hy - 0.85
    ax.text(sx, sy + sh + 0.2, "original query_key_value  (4608 × 4096)  split by rows:", fontsize=9.2,
            color=MUTED, va="center", family=MONO)
    total = 4608
    cx = sx
    seg = {}
    for name, rows, fill, edge in (("q_proj", 4096, BLUE_FILL, BLUE_EDGE), ("k_proj", 256, PURPLE_FILL, PURPLE_EDGE),
                                   ("v_proj", 256, ORANGE_FILL, ORANGE_EDGE)):
        w = sw * rows / total
        ax.add_patch(Rectangle((cx, sy), w, sh, facecolor=fill, edgecolor=edge, lw=1.4))
        seg[name] = (cx + w / 2, edge)
        cx += w
    ax.text(seg["q_proj"][0], sy + sh / 2, "q_proj  4096 × 4096", ha="center", va="center", fontsize=9.5,
            family=MONO)
    for name, tx in (("k_proj", W - 3.3), ("v_proj", W - 1.3)):
        x, edge = seg[name]
        ax.annotate(f"{name}  256 × 4096", xy=(x, sy), xytext=(tx, sy - 0.32), fontsize=9.2, family=MONO,
                    va="center", ha="center", arrowprops=dict(arrowstyle="-", color=edge, lw=1.1))
    ax.text(0.55, sy - 0.72, 'so LoraConfig(target_modules=["q_proj", "k_proj", "v_proj"]), not "query_key_value"',
            fontsize=9.5, color=INK, va="center", family=MONO)
    ax.text(0.55, sy - 1.05, "A LoRA trained on the fused layer converts exactly (the same A, B split by rows); "
            "training on q/k/v directly learns three separate A's.", fontsize=9.2, color=MUTED, va="center")
    return save(fig, "lora.png")


FIGURES = {
    "data_flow": fig_data_flow,
    "label_mask": fig_label_mask,
    "original_vs_fixed": fig_original_vs_fixed,
    "lora": fig_lora,
}


def main(argv: list[str]) -> int:
    global OUT_DIR
    parser = argparse.ArgumentParser(description="Draw the course figures into images/.")
    parser.add_argument("figures", nargs="*", metavar="FIGURE", help=f"any of {', '.join(FIGURES)} (default: all)")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output folder (default: images/)")
    args = parser.parse_args(argv)
    unknown = [w for w in args.figures if w not in FIGURES]
    if unknown:
        parser.error(f"unknown figure(s) {unknown}; choose from {list(FIGURES)}")
    OUT_DIR = args.out.resolve()
    cjk = setup_fonts()
    if not cjk:
        print("no CJK font found: label_mask.png uses English stand-ins "
              "(install one, e.g. apt-get install fonts-noto-cjk, for the Chinese version)")
    for name in args.figures or list(FIGURES):
        print(FIGURES[name](cjk))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

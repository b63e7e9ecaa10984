"""The paper's figures as PNG, from the cell store only.

- token-exits (Fig. 1): captions with each token coloured by the layer it left at;
- per-exit-accuracy (Fig. 3): teacher-forced next-token accuracy per exit, untrained (the shared
  head) versus each strategy's trained exits, on the dev split;
- ablation-bars (Fig. 4a): quality of each row of a table (FREE with loss terms switched off);
- quality-vs-speed (Fig. 4b): quality against speed-up over the calibration grid (dev split), one
  curve per strategy, the full model as a point; by layer-equivalents and by the paper's Spd.
Every figure has a fixed pixel size (`SIZES`); with nothing computed it says so in the image.
"""

from __future__ import annotations

from earlyexit.bench.tables import SCALED, metric_value
from earlyexit.data.tasks import task_of
from earlyexit.util.files import save_figure

DPI = 100
SIZES = {"token-exits": (9.0, 3.0), "per-exit-accuracy": (6.0, 4.0), "ablation-bars": (6.0, 4.0),
         "quality-vs-speed": (10.0, 4.0)}  # inches; pixels = inches x DPI


def pixel_size(kind: str) -> tuple[int, int]:
    width, height = SIZES[kind]
    return round(width * DPI), round(height * DPI)


def _computed(keys, store) -> list[dict]:
    records = [store.get(k) for k in dict.fromkeys(keys)]
    return [r for r in records if r and "report" in r]


def render(figure, keys: list, store, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    records = _computed(keys, store)
    if figure.strategy:
        records = [r for r in records if r["label"] == figure.strategy]
    fig = plt.figure(figsize=SIZES[figure.kind], dpi=DPI)
    draw = {"token-exits": _token_exits, "per-exit-accuracy": _per_exit_accuracy, "ablation-bars": _ablation,
            "quality-vs-speed": _quality_vs_speed}[figure.kind]
    message = draw(fig, records) if records else "no computed cells for this figure (see the tables' footnotes)"
    if message:
        fig.clf()
        fig.text(0.5, 0.5, message, ha="center", va="center", wrap=True)
    if figure.title:
        fig.suptitle(figure.title, fontsize=10)
    save_figure(fig, path, dpi=DPI)
    plt.close(fig)
    return path


def _token_exits(fig, records) -> str | None:
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize

    record = records[0]
    report = record["report"]
    examples = report["results"][report["row"]]["examples"][:4]
    n = report["num_layers"]
    colormap, norm = plt.get_cmap("viridis"), Normalize(1, n)
    axis = fig.add_axes((0.02, 0.05, 0.84, 0.8))
    axis.set_axis_off()
    char_width = 0.0125  # of the axis width, for the monospace font at this size and figure width
    y = 0.92
    for example in examples:
        x = 0.0
        for token, layer in zip(example["tokens"], example["exit_layers"]):
            text = token.strip()
            if not text or (text.startswith("<") and text.endswith(">")):  # </s>, <pad>: not words
                continue
            width = char_width * (len(text) + 1)
            if x + width > 1.0:
                x, y = 0.0, y - 0.13
            shade = colormap(norm(layer))
            axis.text(x, y, text, family="monospace", fontsize=10, va="top",
                      color="white" if sum(shade[:3]) < 1.5 else "black",
                      bbox={"facecolor": shade, "edgecolor": "none", "pad": 1.5})
            x += width
        y -= 0.2
    bar = fig.add_axes((0.89, 0.1, 0.025, 0.7))
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=colormap), cax=bar, label="exit layer")
    fig.text(0.02, 0.93, f"{record['label']}: each token coloured by the decoder layer it left at "
                         f"(of {n}; test split)", fontsize=9)
    return None


def _per_exit_accuracy(fig, records) -> str | None:
    with_curves = [r for r in records if r["report"].get("mid_crisis")]
    if not with_curves:
        return "no per-exit accuracy: it is measured for trained exits on captioning data"
    axis = fig.add_subplot(1, 1, 1)
    untrained = with_curves[0]["report"]["mid_crisis"]["untrained"]
    layers = sorted(untrained, key=int)
    axis.plot([int(k) for k in layers], [untrained[k] for k in layers], "o-", color="gray",
              label="untrained (shared head)")
    for record in with_curves:
        trained = record["report"]["mid_crisis"]["trained"]
        axis.plot([int(k) for k in trained], list(trained.values()), "s-", label=f"{record['label']} (trained)")
    axis.set_xlabel("exit layer")
    axis.set_ylabel("next-token accuracy (teacher forced, dev)")
    axis.legend(fontsize=7)
    fig.tight_layout()
    return None


def _main_metric(report) -> str:
    return task_of(report["task"]).table_metric


def _ablation(fig, records) -> str | None:
    axis = fig.add_subplot(1, 1, 1)
    metric = _main_metric(records[0]["report"])
    labels, values, speeds = [], [], []
    for record in records:
        report = record["report"]
        result = report["results"][report["row"]]
        labels.append(record["label"])
        values.append(metric_value(result["quality"], metric) or 0.0)
        speeds.append(result["speed"]["param_speedup"])
    full = metric_value(records[0]["report"]["results"]["full"]["quality"], metric)
    bars = axis.bar(range(len(labels)), values, color="tab:blue")
    for bar, speed in zip(bars, speeds):
        axis.annotate(f"{speed:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                      va="bottom", fontsize=7)
    if full is not None:
        axis.axhline(full, color="gray", linestyle=":", label="full model")
        axis.legend(fontsize=7)
    shown = values + ([full] if full is not None else [])
    spread = max(shown) - min(shown) or max(abs(max(shown)), 1.0) * 0.05
    axis.set_ylim(min(shown) - 2 * spread, max(shown) + spread)  # differences of a point must be visible
    axis.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=7)
    axis.set_ylabel(f"{metric} (test)" + (" x100" if metric in SCALED else ""))
    axis.set_title("loss ablation (bar labels: Spd, param-based; the axis does not start at 0)", fontsize=9)
    fig.tight_layout()
    return None


def _quality_vs_speed(fig, records) -> str | None:
    with_sweeps = [r for r in records if (r["report"].get("calibration") or {}).get("points")]
    if not with_sweeps:
        return "no calibration sweeps: every cell ran with a fixed threshold"
    metric = _main_metric(with_sweeps[0]["report"])
    scale = 100 if metric in SCALED else 1
    axes = fig.subplots(1, 2)
    for axis, (field, name) in zip(axes, (("layer_speedup", "layer× (layer-equivalents)"),
                                          ("param_speedup", "Spd (param, the paper's)"))):
        for record in with_sweeps:
            points = sorted(record["report"]["calibration"]["points"], key=lambda p: p[field])
            axis.plot([p[field] for p in points], [scale * p["quality"] for p in points], "o-", label=record["label"])
        full = with_sweeps[0]["report"]["calibration"]["full_quality"]
        axis.plot([1.0], [scale * full], "k*", markersize=10, label="full model")
        axis.set_xlabel(f"speed-up: {name}")
        axis.set_ylabel(f"{metric} on dev" + (" x100" if scale == 100 else ""))
        axis.legend(fontsize=7)
    fig.tight_layout()
    return None

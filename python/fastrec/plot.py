"""`fastrec.plot.learning_curve(model)`: a fitted model's training history, drawn with matplotlib.

matplotlib is an optional dependency (`pip install "fastrec[plot]"`); it is imported when a plot is drawn.
"""

from __future__ import annotations

__all__ = ["learning_curve"]


def _history(model) -> dict:
    """Per-epoch series of a fitted model: Recommender / FieldModel keep `history_`; the MLP estimators
    `loss_curve_` and, with early stopping, `validation_scores_`."""
    history = getattr(model, "history_", None)
    if history is not None:
        return {k: list(v) for k, v in history.items() if k != "seconds"}
    if not hasattr(model, "loss_curve_"):
        raise ValueError(f"{type(model).__name__} is not fitted: fit it before plotting its learning curve")
    out = {"loss": list(model.loss_curve_)}
    if getattr(model, "validation_scores_", None):
        out["val_score"] = list(model.validation_scores_)
    return out


def learning_curve(model, ax=None):
    """Training loss per epoch and, where the model was fit with validation data, the validation metric on a
    second y axis; the best epoch (`best_epoch_`) is marked. Returns the matplotlib Axes."""
    history = _history(model)
    try:
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError('fastrec.plot needs matplotlib: pip install "fastrec[plot]"') from e
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    epochs = range(1, len(history["loss"]) + 1)
    lines = ax.plot(epochs, history["loss"], marker="o", label="training loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    val = [k for k in history if k != "loss"]
    if val:
        other = ax.twinx()
        for key in val:
            lines += other.plot(range(1, len(history[key]) + 1), history[key], marker="s", linestyle="--",
                                color="tab:orange", label=key)
        other.set_ylabel(", ".join(val))
    best = getattr(model, "best_epoch_", None)
    if best is not None:
        lines.append(ax.axvline(best, color="gray", linestyle=":", label=f"best epoch ({best})"))
    ax.legend(lines, [line.get_label() for line in lines], loc="best")
    ax.set_title(f"{type(model).__name__} learning curve")
    return ax

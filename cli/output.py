"""Human and --json output for the CLI."""
from __future__ import annotations

import contextlib
import json
import math
import warnings
from typing import Any, Iterator

import numpy as np
import typer

from msif_index.errors import ConfigError

SIGN_CONVENTION = ("Scores are I(z, x_t) = d loss(x_t) / d eps of up-weighting pretraining example z: "
                   "negative = helpful (proponent), positive = harmful (opponent).")


#: what every warning that a model is not at a minimum of its objective says
NOT_A_MINIMUM = "not at a minimum"


@contextlib.contextmanager
def warnings_kept() -> Iterator[list[str]]:
    """Warnings shown as they come (by the current ``warnings.showwarning``), their messages also
    appended to the yielded list (for a command's closing lines)."""
    said: list[str] = []
    shown = warnings.showwarning

    def note(message, *args, **kwargs):
        said.append(str(message))
        shown(message, *args, **kwargs)
    warnings.showwarning = note
    try:
        yield said
    finally:
        warnings.showwarning = shown


def parse_ids(text: str, n: int, what: str) -> list[int]:
    """'3,17,20-22' -> [3, 17, 20, 21, 22], each checked against 0 <= id < n; an empty item ('3,,17')
    and an id given twice ('0,0', '1-5,3') are refused (a typo, or test points counted twice)."""
    ids: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if not part:
                if text.strip():
                    raise ConfigError(f"{what} ids {text!r} have an empty item (two commas, or one at an end); "
                                      f"write them like 3,17 or 20-25")
                continue
            if "-" in part[1:]:
                a, b = part.split("-", 1)
                lo, hi = int(a), int(b)
                if hi < lo:
                    raise ConfigError(f"{what} id range {part!r} ends before it starts; write {hi}-{lo}")
                if lo < 0 or hi >= n:                # checked before the range is expanded
                    raise ConfigError(f"{what} id range {part!r} is out of range: the {what} set has {n} "
                                      f"examples (ids 0..{n - 1})")
                ids.extend(range(lo, hi + 1))
            else:
                ids.append(int(part))
    except ValueError:
        raise ConfigError(f"{what} ids must be integers like 3,17 or 20-25, got {text!r}") from None
    if not ids:
        raise ConfigError(f"no {what} ids given")
    bad = [i for i in ids if not 0 <= i < n]
    if bad:
        raise ConfigError(f"{what} ids {bad[:5]} out of range: the {what} set has {n} examples (ids 0..{n - 1})")
    if len(set(ids)) < len(ids):
        seen: set[int] = set()
        twice = next(i for i in ids if i in seen or seen.add(i))
        raise ConfigError(f"{what} id {twice} is given twice in {text!r}; list each {what} example once")
    return ids


def print_json(obj: Any) -> None:
    """Strict JSON (NaN and infinities, which JSON lacks, become null)."""
    typer.echo(json.dumps(_finite(obj), indent=2, allow_nan=False))


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        return _finite(obj.tolist())
    return obj


#: keys of a dict item (Hugging Face style) that hold its label
LABEL_KEYS = ("label", "labels")


def label_value(dataset: Any, idx: int) -> int | float | str | None:
    """The label of a dataset item as a Python scalar: the second entry of an item shaped (input,
    label, ...), or the "label" / "labels" entry of a dict item; None when there is none (or it is not
    one finite number or string: a token sequence's labels are not shown)."""
    try:
        item = dataset[idx]
    except Exception:  # noqa: BLE001 - labels are decoration only
        return None
    if isinstance(item, dict):
        key = next((k for k in LABEL_KEYS if k in item), None)
        if key is None:
            return None
        y = item[key]
    elif isinstance(item, (tuple, list)) and len(item) >= 2:
        y = item[1]
    else:
        return None
    if hasattr(y, "numel") and not isinstance(y, np.generic):
        y = y.item() if y.numel() == 1 else None            # a tensor
    elif isinstance(y, np.ndarray):
        y = y.item() if y.size == 1 else None
    elif isinstance(y, np.generic):
        y = y.item()
    if isinstance(y, bool) or not isinstance(y, (int, float, str)):
        return None
    if isinstance(y, float) and not math.isfinite(y):
        return None
    return y


def label_of(dataset: Any, idx: int) -> str:
    """``label_value`` as text, or '' when there is none."""
    y = label_value(dataset, idx)
    return "" if y is None else str(y)


def test_point_info(task: Any, test_ids: list[int], values: Any) -> dict[str, Any]:
    """What the rankings are about, for the output: each test point's label (None without one) and
    its measurement l(x_t) on the finetuned model, named 'loss' when the task keeps the default."""
    from msif_index.task import MultiStageTask
    default = getattr(type(task), "measurement", None) is MultiStageTask.measurement
    test = task.test_dataset()
    return {"test_labels": [label_value(test, i) for i in test_ids],
            "test_measurement": [float(v) if math.isfinite(float(v)) else None for v in values],
            "measurement": "finetuning loss" if default else "measurement"}


def ranking_result(method: str, direction: str, finetuned: str | None, test_ids: list[int], ids: Any,
                   scores: Any, info: dict[str, Any]) -> dict[str, Any]:
    """The JSON of a ranking, the same keys in the same order for ``msif query`` ("index": its
    ``finetuned`` is the attached model's key) and ``msif exact`` ("exact": None, no attached model)."""
    return {"method": method, "direction": direction, "finetuned": finetuned, "test_ids": list(test_ids),
            "ids": ids, "scores": scores, **info}


def print_ranking(result: dict, pretrain_dataset: Any = None) -> None:
    """One table per test point: rank, pretraining id, score (and label when the dataset has one),
    under a heading with the test point's label and measurement when the result has them."""
    typer.echo(SIGN_CONVENTION)
    labels, values = result.get("test_labels"), result.get("test_measurement")
    name = "loss" if result.get("measurement") == "finetuning loss" else "measurement"
    for q, test_id in enumerate(result["test_ids"]):
        about = []
        if labels and labels[q] is not None:
            about.append(f"label {labels[q]}")
        if values:
            about.append(f"{name} {values[q]:.4g}" if values[q] is not None else f"{name} not finite")
        head = f"\ntest {test_id}" + (f" ({', '.join(about)})" if about else "")
        head += f": most {result['direction']} pretraining examples"
        if "method" in result:
            head += f" ({result['method']})"
        typer.echo(head)
        has_labels = pretrain_dataset is not None and label_of(pretrain_dataset, 0) != ""
        typer.echo(f"  {'rank':>4}  {'id':>8}  {'score':>12}" + ("  label" if has_labels else ""))
        missing = 0
        for r, (i, s) in enumerate(zip(result["ids"][q], result["scores"][q]), 1):
            if i < 0 or s is None or (isinstance(s, float) and math.isnan(s)):
                missing += 1
                continue
            lab = f"  {label_of(pretrain_dataset, i):>5}" if has_labels else ""
            typer.echo(f"  {r:>4}  {i:>8}  {s:>12.4e}{lab}")
        if missing:
            found = len(result["ids"][q]) - missing
            typer.echo(f"  (the approximate index found {found} of {found + missing}: search more of it, "
                       f"for IVF a larger --nprobe)")

"""The one check every stage runs on its options when it is built: every float is finite and every
bounded option lies in its interval, each failure naming the option.

``NaN`` and ``inf`` pass comparisons such as ``value < 0`` (every comparison with NaN is false), so a
range check alone lets ``lr: .inf`` or ``weight_decay: .nan`` through to the first update, which then
makes every weight non-finite. Here any float anywhere in the options (nested in lists and dicts:
``betas``, ``backbone_kwargs``) must be finite first, then the ranges are checked.
"""
import math
from typing import Any, Iterator, List, Mapping, Tuple

# Interval notation used by the stages: "[0, inf)", "(0, 1)", "[0, 1]".
Ranges = Mapping[str, str]


def _numbers(name: str, value: Any) -> Iterator[Tuple[str, float]]:
    """``(path, number)`` of every int or float in ``value``, with lists and dicts walked
    (``betas[1]``, ``backbone_kwargs.mlp_ratio``); bools are not numbers here."""
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield name, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _numbers(f"{name}.{key}", item)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _numbers(f"{name}[{index}]", item)


def parse_interval(interval: str) -> Tuple[float, float, bool, bool]:
    """``"[0, 1)"`` -> ``(0.0, 1.0, low_closed=True, high_closed=False)``."""
    text = interval.strip()
    if text[0] not in "[(" or text[-1] not in "])" or text.count(",") != 1:
        raise ValueError(f"not an interval: {interval!r} (write e.g. '[0, 1)' or '(0, inf)')")
    low, high = (float(part) for part in text[1:-1].split(","))
    return low, high, text[0] == "[", text[-1] == "]"


def in_interval(value: float, interval: str) -> bool:
    low, high, low_closed, high_closed = parse_interval(interval)
    above = value >= low if low_closed else value > low
    below = value <= high if high_closed else value < high
    return above and below


def describe_interval(interval: str) -> str:
    """``"(0, inf)"`` -> ``"> 0"``, ``"[0, 1]"`` -> ``"in [0, 1]"``, as a message says it."""
    low, high, low_closed, _ = parse_interval(interval)
    if math.isinf(high):
        return f"{'>=' if low_closed else '>'} {low:g}"
    return f"in {interval}"


def option_problems(options: Mapping[str, Any], ranges: Ranges = {}) -> List[str]:
    """One line per bad option: a non-finite float anywhere in ``options``, or a value (each
    element, for a sequence) outside its interval in ``ranges``. ``None`` values are not checked."""
    problems = [f"{path} must be a finite number, got {number}"
                for name, value in options.items() for path, number in _numbers(name, value)
                if not math.isfinite(number)]
    for name, interval in ranges.items():
        for path, number in _numbers(name, options.get(name)):
            if math.isfinite(number) and not in_interval(number, interval):
                problems.append(f"{path} must be {describe_interval(interval)}, got {number}")
    return problems


def check_options(owner: str, options: Mapping[str, Any], ranges: Ranges = {}) -> None:
    """Raise ``ValueError`` naming every bad option of ``owner`` (see :func:`option_problems`).

    Args:
        owner: what the options configure, for the message (``"MAE"``, ``"DINO"``...).
        options: option name -> value (a module's ``hparams``).
        ranges: option name -> interval its value (each element of a sequence) must lie in.
    """
    problems = option_problems(options, ranges)
    if problems:
        raise ValueError(f"{owner}: " + "; ".join(problems))


def check_some_visible(mask_ratio: float, num_patches: int, owner: str = "MAE") -> None:
    """Raise ``ValueError`` when masking ``mask_ratio`` of ``num_patches`` leaves no patch visible:
    the encoder keeps ``int(L * (1 - mask_ratio))`` patches and needs at least one."""
    if int(num_patches * (1 - mask_ratio)) < 1:
        raise ValueError(
            f"{owner}: mask_ratio={mask_ratio} leaves no patch visible: int({num_patches} * (1 - {mask_ratio})) = 0 "
            f"of the {num_patches} patches stay; use mask_ratio <= 1 - 1/{num_patches}"
        )

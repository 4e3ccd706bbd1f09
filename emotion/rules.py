"""Escalation rules: loaded from YAML, evaluated as a pure function of the turn history."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from emotion.errors import ConfigError
from emotion.settings import LABELS

DEFAULT_RULES_YAML = """\
rules:
  - name: angry_caller
    emotions: [angry]
    min_confidence: 0.7
    cooldown_turns: 10
"""
_RULE_KEYS = {"name", "emotions", "min_confidence", "consecutive_turns", "at_least", "text_contains", "cooldown_turns",
              "intents", "channels", "action"}
ACTIONS = ("handoff", "alert")  # alert: tell a supervisor, keep the caller with the bot


@dataclass(frozen=True)
class Turn:
    """One analysed user turn, as kept in the ``emotion_history`` slot."""

    emotion: str
    confidence: float
    escalated: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"emotion": self.emotion, "confidence": round(self.confidence, 4), "escalated": self.escalated}

    @classmethod
    def from_dict(cls, data: Any) -> Turn | None:
        try:
            return cls(str(data["emotion"]), float(data["confidence"]), data.get("escalated"))
        except (KeyError, TypeError, ValueError):
            return None


@dataclass(frozen=True)
class EscalationRule:
    name: str
    emotions: frozenset[str]
    min_confidence: float = 0.0
    consecutive_turns: int = 1
    at_least: tuple[int, int] | None = None  # (K turns, of the last N)
    text_contains: tuple[str, ...] = ()
    cooldown_turns: int = 0
    intents: frozenset[str] = frozenset()  # empty: any intent
    channels: frozenset[str] = frozenset()  # empty: any input channel
    action: str = "handoff"

    def matches(self, turn: Turn) -> bool:
        return turn.emotion in self.emotions and turn.confidence >= self.min_confidence


@dataclass(frozen=True)
class Decision:
    """Whether a rule fired (``fired``), and whether it hands the caller off (``escalate``)
    or only alerts a supervisor."""

    fired: bool
    rule: str | None = None
    reason: str | None = None
    action: str | None = None

    @property
    def escalate(self) -> bool:
        return self.action == "handoff"


def evaluate_rules(history: Sequence[Turn], rules: Sequence[EscalationRule], text: str | None = None, *,
                   intent: str | None = None, channel: str | None = None) -> Decision:
    """Decide on the last turn of ``history`` (oldest first). The first rule that fires wins."""
    if not history:
        return Decision(False)
    current = history[-1]
    for rule in rules:
        if not rule.matches(current):
            continue
        if (rule.intents and intent not in rule.intents) or (rule.channels and channel not in rule.channels):
            continue
        if rule.cooldown_turns and any(t.escalated for t in history[-1 - rule.cooldown_turns : -1]):
            continue
        recent = history[-rule.consecutive_turns :]
        if len(recent) < rule.consecutive_turns or not all(rule.matches(t) for t in recent):
            continue
        if rule.at_least is not None:
            k, n = rule.at_least
            if sum(rule.matches(t) for t in history[-n:]) < k:
                continue
        if rule.text_contains and not any(phrase_in(p, text or "") for p in rule.text_contains):
            continue
        reason = f"{rule.name}: {current.emotion} {current.confidence:.2f} >= {rule.min_confidence:.2f}"
        if rule.consecutive_turns > 1:
            reason += f" on {rule.consecutive_turns} turns in a row"
        if rule.at_least is not None:
            reason += f", {rule.at_least[0]} of the last {rule.at_least[1]} turns"
        return Decision(True, rule.name, reason, rule.action)
    return Decision(False)


def rule_as_dict(rule: EscalationRule) -> dict[str, Any]:
    """A rule as its YAML reads, every key given (the review page draws from it)."""
    return {"name": rule.name, "emotions": sorted(rule.emotions), "min_confidence": rule.min_confidence,
            "consecutive_turns": rule.consecutive_turns,
            "at_least": {"turns": rule.at_least[0], "of_last": rule.at_least[1]} if rule.at_least else None,
            "text_contains": list(rule.text_contains), "cooldown_turns": rule.cooldown_turns, "intents": sorted(rule.intents),
            "channels": sorted(rule.channels), "action": rule.action}


def take_turn(history: Sequence[Turn], turn: Turn, rules: Sequence[EscalationRule], text: str | None = None, *,
              intent: str | None = None, channel: str | None = None) -> tuple[Decision, list[Turn]]:
    """What the analyze action does with a new turn: it joins ``history``, the rules decide on
    it, and a turn on which a rule fired is marked with the rule's name (alerts count for
    cooldowns too, so a supervisor is not paged on every turn). Returns the decision and the
    history with the new turn last."""
    history = [*history, turn]
    decision = evaluate_rules(history, rules, text, intent=intent, channel=channel)
    if decision.fired:
        history[-1] = Turn(turn.emotion, turn.confidence, decision.rule)
    return decision, history


def replay_turns(turns: Sequence[Turn], rules: Sequence[EscalationRule], *, history_turns: int = 20, text: str | None = None,
                 intent: str | None = None, channel: str | None = None) -> list[Decision]:
    """Each turn's decision, the turns taken in order as one conversation's, the way the
    analyze action takes them: the history kept between turns is the ``emotion_history``
    slot's, its last ``history_turns`` turns with confidences rounded as the slot holds them.
    The review page marks a recording's segments with it, one segment a turn."""
    kept: list[Turn] = []
    decisions = []
    for turn in turns:
        decision, history = take_turn(kept, turn, rules, text, intent=intent, channel=channel)
        last = Turn.from_dict(history[-1].as_dict())  # as the next turn reads it back from the slot
        kept = [*history[-history_turns:-1], last]
        decisions.append(decision)
    return decisions


# Scripts written without spaces between words: a keyword there is matched as a substring.
_UNSEGMENTED = re.compile(r"[\u0e00-\u0eff\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


def phrase_in(phrase: str, text: str) -> bool:
    """Whether ``text`` holds ``phrase``: as whole words (any case, punctuation inside the
    phrase kept, so "don't" and "e-mail" match), or as a substring for Chinese, Japanese
    and Thai."""
    phrase, text = _fold(phrase), _fold(text)
    if _UNSEGMENTED.search(phrase):
        return phrase in text
    return re.search(r"(?<!\w)" + re.escape(phrase) + r"(?!\w)", text) is not None


def _fold(text: str) -> str:
    return " ".join(text.replace("\u2019", "'").casefold().split())


def load_rules(source: str | Path | None, *, history_turns: int = 20, labels: Sequence[str] = LABELS) -> list[EscalationRule]:
    """Read rules from a YAML file (``None``: the shipped default). Errors name the line."""
    if source is None:
        text, where = DEFAULT_RULES_YAML, "default rules"
    else:
        try:
            text, where = Path(source).read_text(encoding="utf-8"), str(source)
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read rules file {source}: {exc}") from None
    return parse_rules(text, where=where, history_turns=history_turns, labels=labels)


def parse_rules(text: str, *, where: str = "rules", history_turns: int = 20, labels: Sequence[str] = LABELS) -> list[EscalationRule]:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML: {exc}") from None
    if root is None or not isinstance(root, yaml.MappingNode):
        raise ConfigError(f"{where}: expected a mapping with a 'rules' list")
    data = yaml.safe_load(text)
    nodes = dict((k.value, v) for k, v in root.value)
    if set(data) != {"rules"} or not isinstance(data["rules"], list) or not data["rules"]:
        raise ConfigError(f"{where}: expected exactly one key 'rules' holding a non-empty list")
    rules, names = [], set()
    for raw, node in zip(data["rules"], nodes["rules"].value):
        line = node.start_mark.line + 1
        try:
            rule = _rule(raw, history_turns, labels)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{where}, line {line}: {exc}") from None
        if rule.name in names:
            raise ConfigError(f"{where}, line {line}: duplicate rule name {rule.name!r}")
        names.add(rule.name)
        rules.append(rule)
    return rules


def _rule(raw: Any, history_turns: int, labels: Sequence[str]) -> EscalationRule:
    if not isinstance(raw, dict):
        raise ValueError("each rule must be a mapping")
    unknown = set(raw) - _RULE_KEYS
    if unknown:
        raise ValueError(f"unknown key(s) {sorted(unknown)}; allowed: {sorted(_RULE_KEYS)}")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ValueError("'name' must be a non-empty string")
    emotions = raw.get("emotions")
    if isinstance(emotions, str):
        emotions = [emotions]
    if not isinstance(emotions, list) or not emotions or not all(isinstance(e, str) for e in emotions):
        raise ValueError(f"rule {name!r}: 'emotions' must be a label or a list of labels")
    bad = [e for e in emotions if e not in labels]
    if bad:
        raise ValueError(f"rule {name!r}: unknown emotion(s) {bad}; expected some of {', '.join(labels)}")
    conf = raw.get("min_confidence", 0.0)
    if isinstance(conf, bool) or not isinstance(conf, (int, float)) or not 0.0 <= conf <= 1.0:
        raise ValueError(f"rule {name!r}: 'min_confidence' must be a number in [0, 1]")
    consecutive = _count(raw.get("consecutive_turns", 1), "consecutive_turns", name, history_turns)
    at_least = raw.get("at_least")
    if at_least is not None:
        if not isinstance(at_least, dict) or set(at_least) != {"turns", "of_last"}:
            raise ValueError(f"rule {name!r}: 'at_least' must be {{turns: K, of_last: N}}")
        k = _count(at_least["turns"], "at_least.turns", name, history_turns)
        n = _count(at_least["of_last"], "at_least.of_last", name, history_turns)
        if k > n:
            raise ValueError(f"rule {name!r}: at_least.turns ({k}) is more than of_last ({n})")
        at_least = (k, n)
    words = _strings(raw, "text_contains", name)
    action = raw.get("action", "handoff")
    if action not in ACTIONS:
        raise ValueError(f"rule {name!r}: 'action' must be one of {', '.join(ACTIONS)}, got {action!r}")
    cooldown = raw.get("cooldown_turns", 0)
    if cooldown != 0:
        cooldown = _count(cooldown, "cooldown_turns", name, history_turns - 1)
    return EscalationRule(
        name=name.strip(),
        emotions=frozenset(emotions),
        min_confidence=float(conf),
        consecutive_turns=consecutive,
        at_least=at_least,
        text_contains=tuple(words),
        cooldown_turns=cooldown,
        intents=frozenset(_strings(raw, "intents", name)),
        channels=frozenset(_strings(raw, "channels", name)),
        action=action,
    )


def _strings(raw: dict, key: str, name: str) -> list[str]:
    value = raw.get(key, [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ValueError(f"rule {name!r}: {key!r} must be a string or a list of non-empty strings")
    return [v.strip() for v in value]


def _count(value: Any, key: str, name: str, limit: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise ValueError(f"rule {name!r}: {key!r} must be a whole number in [1, {limit}] (the history keeps {limit} turns)")
    return value

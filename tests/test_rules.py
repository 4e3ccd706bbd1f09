"""Escalation rules: table-driven decisions, loader errors with line numbers, fuzzed loader."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emotion.errors import ConfigError
from emotion.rules import EscalationRule, Turn, evaluate_rules, load_rules, parse_rules

ANGRY_07 = EscalationRule("angry", frozenset({"angry"}), 0.7)
TWICE = EscalationRule("twice", frozenset({"angry", "disgusted"}), 0.5, consecutive_turns=2)
K_OF_N = EscalationRule("k_of_n", frozenset({"sad"}), 0.6, at_least=(3, 5))
WORDS = EscalationRule("manager", frozenset({"angry"}), 0.4, text_contains=("manager", "speak to a human"))
COOL = EscalationRule("cool", frozenset({"angry"}), 0.7, cooldown_turns=3)


def h(*turns):
    return [Turn(e, c, esc) for e, c, *rest in turns for esc in [rest[0] if rest else None]]


CASES = [
    ("angry above threshold", [ANGRY_07], h(("angry", 0.9)), None, "angry"),
    ("angry exactly at threshold", [ANGRY_07], h(("angry", 0.7)), None, "angry"),
    ("angry below threshold", [ANGRY_07], h(("angry", 0.6)), None, None),
    ("other emotion", [ANGRY_07], h(("sad", 0.99)), None, None),
    ("empty history", [ANGRY_07], [], None, None),
    ("earlier angry turn does not count", [ANGRY_07], h(("angry", 0.9), ("neutral", 0.8)), None, None),
    ("two in a row", [TWICE], h(("angry", 0.6), ("disgusted", 0.55)), None, "twice"),
    ("two, not in a row", [TWICE], h(("angry", 0.6), ("neutral", 0.9), ("angry", 0.6)), None, None),
    ("only one turn yet", [TWICE], h(("angry", 0.9)), None, None),
    ("3 of last 5", [K_OF_N], h(("sad", 0.7), ("neutral", 0.9), ("sad", 0.8), ("happy", 0.5), ("sad", 0.61)), None, "k_of_n"),
    ("2 of last 5", [K_OF_N], h(("sad", 0.7), ("neutral", 0.9), ("sad", 0.5), ("happy", 0.5), ("sad", 0.61)), None, None),
    ("k of n needs the current turn", [K_OF_N], h(("sad", 0.7), ("sad", 0.7), ("sad", 0.7), ("neutral", 0.9)), None, None),
    ("words present", [WORDS], h(("angry", 0.5)), "Get me your MANAGER now", "manager"),
    ("phrase present", [WORDS], h(("angry", 0.5)), "I want to speak to a human.", "manager"),
    ("words absent", [WORDS], h(("angry", 0.5)), "where is my parcel", None),
    ("word inside another word does not count", [WORDS], h(("angry", 0.5)), "managerial issue", None),
    ("no transcript", [WORDS], h(("angry", 0.5)), None, None),
    ("cooldown blocks", [COOL], h(("angry", 0.9, "cool"), ("angry", 0.9)), None, None),
    ("cooldown blocks any earlier escalation", [COOL], h(("angry", 0.9, "other_rule"), ("neutral", 0.5), ("angry", 0.9)), None, None),
    ("cooldown over", [COOL], h(("angry", 0.9, "cool"), ("n", 0.5), ("n", 0.5), ("n", 0.5), ("angry", 0.9)), None, "cool"),
    ("first rule that fires wins", [TWICE, ANGRY_07], h(("angry", 0.9), ("angry", 0.9)), None, "twice"),
    ("later rule fires", [TWICE, ANGRY_07], h(("angry", 0.9)), None, "angry"),
]


@pytest.mark.parametrize("name,rules,history,text,fired", CASES, ids=[c[0] for c in CASES])
def test_evaluate_rules(name, rules, history, text, fired):
    decision = evaluate_rules(history, rules, text)
    assert decision.escalate is (fired is not None)
    assert decision.rule == fired
    if fired:
        assert decision.reason.startswith(fired + ":")


def test_default_rules_are_angry_at_0_7():
    (rule,) = load_rules(None)
    assert rule.emotions == {"angry"} and rule.min_confidence == 0.7
    assert evaluate_rules(h(("angry", 0.71)), [rule]).escalate
    assert not evaluate_rules(h(("angry", 0.69)), [rule]).escalate


def test_shipped_rules_file_loads(tmp_path):
    from pathlib import Path

    rules = load_rules(Path(__file__).parents[1] / "domain_snippets" / "emotion_rules.yml")
    assert [r.name for r in rules] == ["angry_caller", "upset_twice", "distressed", "asks_for_manager"]


BAD_FILES = [
    ("rules: [", "not valid YAML"),
    ("- a\n- b\n", "expected a mapping"),
    ("rulez: []\n", "exactly one key 'rules'"),
    ("rules: []\n", "non-empty list"),
    ("rules:\n  - name: a\n    emotions: [angry]\n  - name: b\n    emotions: [furious]\n", "line 4: .*unknown emotion"),
    ("rules:\n  - name: a\n    emotions: angry\n    min_confidence: 1.5\n", "line 2: .*min_confidence"),
    ("rules:\n  - name: a\n    emotions: [angry]\n    treshold: 0.5\n", "line 2: .*unknown key.*treshold"),
    ("rules:\n  - name: a\n    emotions: [angry]\n    consecutive_turns: 0\n", "consecutive_turns"),
    ("rules:\n  - name: a\n    emotions: [angry]\n    at_least: {turns: 4, of_last: 3}\n", "more than of_last"),
    ("rules:\n  - name: a\n    emotions: [angry]\n    cooldown_turns: 50\n", "cooldown_turns.*history keeps"),
    ("rules:\n  - name: a\n    emotions: [angry]\n  - name: a\n    emotions: [sad]\n", "line 4: duplicate rule name"),
    ("rules:\n  - emotions: [angry]\n", "'name'"),
    ("rules:\n  - name: a\n    emotions: [angry]\n    text_contains: [1, 2]\n", "text_contains"),
]


@pytest.mark.parametrize("text,message", BAD_FILES)
def test_bad_rule_files_are_rejected_with_line_and_reason(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_rules(text, where="rules.yml")


def test_missing_rules_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read rules file"):
        load_rules(tmp_path / "nope.yml")


yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 50) | st.floats(allow_nan=True) | st.text(max_size=12)
    | st.sampled_from(["angry", "sad", "name", "emotions", "rules"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["name", "emotions", "min_confidence", "consecutive_turns", "at_least", "turns", "of_last",
                         "text_contains", "cooldown_turns", "rules", "x"]), children, max_size=5),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(yaml_values)
def test_rules_loader_never_crashes_on_any_document(value):
    import yaml

    try:
        rules = parse_rules(yaml.safe_dump({"rules": value} if not isinstance(value, dict) else value))
    except ConfigError:
        return
    assert rules and all(isinstance(r, EscalationRule) for r in rules)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_rules_loader_never_crashes_on_any_text(text):
    try:
        parse_rules(text)
    except ConfigError:
        pass


@pytest.mark.parametrize("phrase,text,hit", [
    ("don't", "I don't want this", True),
    ("e-mail", "I sent an E-mail twice", True),
    ("e-mail", "email", False),
    ("manager", "managers", False),
    ("speak to a human", "Let me SPEAK  to a human now", True),
    ("don't", "I don’t want this", True),  # a typographic apostrophe from a speech recogniser
    ("经理", "我要找你们经理", True),
    ("退款", "我要退货", False),
    ("マネージャー", "マネージャーを呼んで", True),
])
def test_text_contains_matches_punctuated_and_unsegmented_phrases(phrase, text, hit):
    from emotion.rules import phrase_in

    assert phrase_in(phrase, text) is hit


def test_chinese_keyword_escalates():
    rules = parse_rules("rules:\n  - name: manager\n    emotions: [angry]\n    min_confidence: 0.4\n    text_contains: [经理]\n")
    assert evaluate_rules([Turn("angry", 0.5)], rules, "我要找你们经理").escalate
    assert not evaluate_rules([Turn("angry", 0.5)], rules, "我要退款").escalate


def test_rules_scoped_by_intent_and_channel():
    rules = parse_rules(
        "rules:\n"
        "  - name: billing\n    emotions: [angry]\n    min_confidence: 0.6\n    intents: [complain, billing]\n"
        "  - name: phone\n    emotions: [angry]\n    min_confidence: 0.7\n    channels: twilio\n"
        "  - name: anywhere\n    emotions: [angry]\n    min_confidence: 0.8\n"
    )
    turn = [Turn("angry", 0.65)]
    assert evaluate_rules(turn, rules, intent="billing").rule == "billing"
    assert not evaluate_rules(turn, rules, intent="greet").escalate
    assert evaluate_rules([Turn("angry", 0.75)], rules, intent="greet", channel="twilio").rule == "phone"
    assert not evaluate_rules([Turn("angry", 0.75)], rules, intent="greet", channel="rest").escalate
    assert evaluate_rules([Turn("angry", 0.85)], rules, intent="greet", channel="rest").rule == "anywhere"


@pytest.mark.parametrize("body,message", [
    ("    intents: [1, 2]\n", "'intents' must be a string or a list of non-empty strings"),
    ("    channels: {rest: 1}\n", "'channels' must be"),
    ("    scope: billing\n", r"unknown key\(s\) \['scope'\]"),
])
def test_bad_scopes_are_refused_with_the_line(body, message):
    with pytest.raises(ConfigError, match=f"line 2: .*{message}"):
        parse_rules("rules:\n  - name: a\n    emotions: [angry]\n" + body)


def test_rules_are_checked_against_the_labels_in_use():
    text = "rules:\n  - name: a\n    emotions: [fearful]\n"
    assert parse_rules(text)[0].emotions == {"fearful"}
    with pytest.raises(ConfigError, match=r"unknown emotion\(s\) \['fearful'\]; expected some of angry, happy, neutral, sad"):
        parse_rules(text, labels=("angry", "happy", "neutral", "sad"))


def test_alert_rules_fire_without_handing_off():
    rules = parse_rules("rules:\n  - name: watch\n    emotions: [sad]\n    min_confidence: 0.5\n    action: alert\n"
                        "  - name: angry\n    emotions: [angry]\n    min_confidence: 0.7\n")
    alert = evaluate_rules([Turn("sad", 0.6)], rules)
    assert alert.fired and alert.rule == "watch" and alert.action == "alert" and not alert.escalate
    handoff = evaluate_rules([Turn("angry", 0.8)], rules)
    assert handoff.fired and handoff.escalate and handoff.action == "handoff"
    assert not evaluate_rules([Turn("happy", 0.9)], rules).fired
    with pytest.raises(ConfigError, match="line 2: rule 'a': 'action' must be one of handoff, alert, got 'page'"):
        parse_rules("rules:\n  - name: a\n    emotions: [angry]\n    action: page\n")


def test_replaying_turns_decides_each_as_the_analyze_action_would():
    """The review page's marks: each turn decided on the history the action keeps between
    turns (the slot's last history_turns turns, confidences rounded to 4 places)."""
    from emotion.rules import replay_turns

    turns = h(("angry", 0.9), ("angry", 0.9), ("angry", 0.6), ("angry", 0.9), ("angry", 0.9), ("angry", 0.9), ("angry", 0.9))
    assert [d.rule for d in replay_turns(turns, [COOL])] == ["cool", None, None, None, "cool", None, None]
    assert [d.rule for d in replay_turns(turns, [TWICE, COOL])] == ["cool"] + ["twice"] * 6
    # Two turns kept: the cooldown no longer sees an escalation three turns back.
    assert [d.rule for d in replay_turns(turns, [COOL], history_turns=2)] == ["cool", None, None, "cool", None, None, "cool"]
    # 0.69996 is below 0.7 as it comes, and 0.7 as the slot keeps it for the next turn.
    two = EscalationRule("two", frozenset({"angry"}), 0.7, consecutive_turns=2)
    assert [d.fired for d in replay_turns(h(("angry", 0.69996), ("angry", 0.7)), [two])] == [False, True]

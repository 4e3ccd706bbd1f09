"""A Rasa 3.x policy that routes an escalated caller to ``action_handoff_to_human``.

Runs inside the Rasa server, not the action server, and needs nothing but Rasa. Copy this
file next to your bot's config.yml (or put it on PYTHONPATH) and add it to the policies.

Why a policy: ``escalate`` is set by the slot-mapping action after the user message,
and RulePolicy prefers the longest matching rule, so the bot's ordinary
``intent: X -> utter_Y`` rules win over a ``slot_was_set: escalate`` rule. This policy
predicts the handoff with confidence 1.0 at a priority above RulePolicy's, so it wins
whatever the intent, for every intent the bot has now or adds later.
"""

from __future__ import annotations

from typing import Any

from rasa.core.policies.policy import Policy, PolicyPrediction
from rasa.engine.recipes.default_recipe import DefaultV1Recipe
from rasa.engine.storage.resource import Resource
from rasa.shared.core.constants import ACTION_LISTEN_NAME
from rasa.shared.core.domain import Domain
from rasa.shared.core.generator import TrackerWithCachedStates
from rasa.shared.core.trackers import DialogueStateTracker


@DefaultV1Recipe.register(
    DefaultV1Recipe.ComponentType.POLICY_WITHOUT_END_TO_END_SUPPORT, is_trainable=False
)
class EmotionEscalationPolicy(Policy):
    @staticmethod
    def get_default_config() -> dict[str, Any]:
        # RulePolicy has priority 4 (Rasa 3.6); ties at confidence 1.0 go to the higher.
        return {
            "priority": 6,
            "slot": "escalate",
            "action": "action_handoff_to_human",
        }

    def train(
        self, training_trackers: list[TrackerWithCachedStates], domain: Domain, **kwargs: Any
    ) -> Resource:
        return self._resource

    def predict_action_probabilities(
        self,
        tracker: DialogueStateTracker,
        domain: Domain,
        rule_only_data: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> PolicyPrediction:
        probabilities = self._default_predictions(domain)
        action = self.config["action"]
        # Only right after the user spoke (the slot-mapping action adds no ActionExecuted),
        # so the handoff runs once per escalation.
        if (
            tracker.get_slot(self.config["slot"]) is True
            and tracker.latest_action_name == ACTION_LISTEN_NAME
            and action in domain.action_names_or_texts
        ):
            probabilities[domain.index_for_action(action)] = 1.0
        return self._prediction(probabilities)

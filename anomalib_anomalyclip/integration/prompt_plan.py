"""Where a run's prompts come from: given, learned in ``fit``, or the authors' released prompts.

One decision, :func:`plan_prompts`, taken when a fit is set up and again when a loop starts to score (after a
checkpoint may have brought prompts); the prompts themselves are found by :mod:`.weights`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from anomalib_anomalyclip.weights import ReleasedPrompts, released_prompts_for, resolve_prompt_weights

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptPlan:
    """Where a run's prompts come from (see :func:`plan_prompts`).

    Attributes:
        learn: ``fit`` learns (or fine-tunes) the prompts.
        released: released prompts to load first, or ``None``.
        reason: why the released prompts are used (for the log line).
    """

    learn: bool
    released: ReleasedPrompts | None = None
    reason: str = ""

    def released_file(self) -> Path:
        """The released prompts' file (downloaded once into the cache), with one log line saying why they are used."""
        name, trained_on = self.released.name, self.released.trained_on
        message = "AnomalyCLIP uses the released prompts '%s' (trained on %s), because %s; pass --model.prompt_weights "
        logger.info(message + "to choose others.", name, trained_on, self.reason)
        return resolve_prompt_weights(name)


def plan_prompts(
    prompt_weights: str | None,
    train_prompts: bool | None,
    k_shot: int,
    *,
    ready: bool,
    fitting: bool,
    datamodule: object | None = None,
) -> PromptPlan:
    """Decide where the prompts of a run come from.

    * Prompts are learned in ``fit`` when asked (``training.learn=True``), or when none are given and
      ``training.learn`` is left open; never with ``k_shot`` (a few-shot model fits references, not prompts).
    * When none are given and none can be learned (the fit data holds normal images only, as every anomalib
      datamodule's train split, or the run does not fit), the authors' released prompts trained on the *other*
      dataset are used (:func:`released_prompts_for`).

    Args:
        prompt_weights: the ``prompt_weights`` argument of the model.
        train_prompts: ``training.learn`` (``None``: learn when no prompts are given).
        k_shot: the number of few-shot references (0: zero-shot).
        ready: the model holds usable prompts already (given, learned, or from a checkpoint).
        fitting: the run is a ``fit`` (at set-up, before the first step).
        datamodule: the run's datamodule, if any.

    Raises:
        ValueError: prompts must be learned (``training.learn=True``) but the fit data holds normal images only.
    """
    chosen_by_data = prompt_weights is None and not train_prompts
    wants_to_learn = not k_shot and (prompt_weights is None if train_prompts is None else bool(train_prompts))
    if fitting and wants_to_learn:
        if not training_data_is_normal_only(datamodule):
            return PromptPlan(learn=True)
        name = type(datamodule).__name__
        if chosen_by_data:
            return PromptPlan(
                False, released_prompts_for(datamodule), f"the training data of {name} holds only normal images"
            )
        raise ValueError(
            f"The training data of {name} holds only normal images, but AnomalyCLIP learns its prompts from labelled "
            "normal and anomalous images (with masks where available). Train on an auxiliary labelled set with "
            "--data anomalib_anomalyclip.data.AuxiliaryDataModule, or evaluate zero-shot with "
            "--model.prompt_weights anomalyclip-mvtec (or a prompt file)."
        )
    if not ready and chosen_by_data:
        return PromptPlan(False, released_prompts_for(datamodule), "no prompts were given and this run trains none")
    return PromptPlan(learn=False)


def training_data_is_normal_only(datamodule: object) -> bool:
    """Whether the datamodule's train split is known to hold normal images only (anomalib's one-class data)."""
    samples = getattr(getattr(datamodule, "train_data", None), "samples", None)
    if samples is None or "label_index" not in getattr(samples, "columns", ()):
        return False
    return bool(len(samples)) and not bool((samples["label_index"] == 1).any())


class PromptState(str, Enum):
    """Where a model's prompts stand: the one state the Lightning module keeps about them.

    * ``missing``: none yet, and ``fit`` learns none; a loop that scores loads the released ones (:func:`plan_prompts`).
    * ``untrained``: randomly initialised; ``fit`` learns them, scoring refuses them.
    * ``learning``: ``fit`` learns (or fine-tunes) them; they may be scored (validation within the fit).
    * ``fixed``: given, released, restored from a checkpoint or learned; ``fit`` leaves them as they are.
    """

    MISSING = "missing"
    UNTRAINED = "untrained"
    LEARNING = "learning"
    FIXED = "fixed"

    @classmethod
    def initial(cls, given: bool, learn: bool) -> PromptState:
        """The state of a new model: prompts ``given`` (weights loaded) or not; ``learn`` in ``fit`` or not."""
        if learn:
            return cls.LEARNING if given else cls.UNTRAINED
        return cls.FIXED if given else cls.MISSING

    @property
    def ready(self) -> bool:
        """Whether the prompts may score images."""
        return self in (PromptState.LEARNING, PromptState.FIXED)

    @property
    def learns(self) -> bool:
        """Whether ``fit`` learns the prompts."""
        return self in (PromptState.UNTRAINED, PromptState.LEARNING)

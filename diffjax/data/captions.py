"""Captions from class labels: templates x class phrases, with the right article ("an ankle boot").

A caption is ``template.format(phrase)`` where the template's article before ``{}`` ("a {}" or
"an {}", any case) is rewritten to agree with the phrase::

    >>> format_caption("a photo of a {}", "ankle boot")
    'a photo of an ankle boot'
    >>> caption_for(1, 0)                       # Fashion-MNIST label 1, template 0, phrase 0
    'a photo of a trouser'
    >>> caption_for(1, 0, phrase_index=1)
    'a photo of a pair of trousers'

For labelled datasets the pipeline chooses the template and the phrase *at load time* from the
label with a seeded RNG (:class:`LabelCaptioner`), so the wording varies between epochs and can be
changed by config (``data.caption_templates``, ``data.class_names``) without rebuilding the dataset.
Evaluation code builds fixed prompts with :func:`caption_for` / :func:`class_prompts`.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

__all__ = [
    "CLASS_NAMES",
    "CLASS_PHRASES",
    "DEFAULT_TEMPLATES",
    "HELD_OUT_TEMPLATES",
    "LabelCaptioner",
    "VARIED_TEMPLATES",
    "article_for",
    "caption_for",
    "check_templates",
    "class_prompts",
    "format_caption",
    "phrases_from_names",
]

# Fashion-MNIST's official class names (Zalando's README), in label order 0..9.
CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# Phrases a caption may use for each Fashion-MNIST class (the first is the canonical one).
CLASS_PHRASES: tuple[tuple[str, ...], ...] = (
    ("t-shirt", "t-shirt top", "top"),
    ("trouser", "pair of trousers"),
    ("pullover", "sweater"),
    ("dress",),
    ("coat",),
    ("sandal",),
    ("shirt",),
    ("sneaker",),
    ("bag",),
    ("ankle boot",),
)

DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}",
    "a {}",
    "an image of a {}",
    "a picture of a {}",
    "a black and white photo of a {}",
)

# Thirty training wordings: the five above and 25 more. They share only "a", "of" and "image" with
# HELD_OUT_TEMPLATES, so a model trained on these and prompted with those meets words it never saw (studio, shot,
# one, for, sale, catalogue, small, on, plain, background; docs/lab_notebook.md, "Unseen wordings").
VARIED_TEMPLATES: tuple[str, ...] = DEFAULT_TEMPLATES + (
    "a close-up photo of a {}", "a grayscale picture of a {}", "a low resolution photo of a {}",
    "a blurry photo of a {}", "a cropped photo of a {}", "a bright photo of a {}", "a dark photo of a {}", "the {}",
    "a good photo of a {}", "a photo of my {}", "a centered photo of a {}", "a {} in grayscale",
    "a {} seen from the front", "this is a {}", "there is a {} in the picture", "a nice {}", "an old {}", "a new {}",
    "a large {}", "a product photo of a {}", "a {}, photographed", "a photograph of a {}", "a neat {}",
    "a pixelated picture of a {}", "a faded photo of a {}",
)

# Prompt wordings for evaluating generalisation (config.evaluation.prompt_templates), none a training wording.
HELD_OUT_TEMPLATES: tuple[str, ...] = (
    "a studio shot of a {}",
    "one {} for sale",
    "a catalogue image of a {}",
    "a small {}",
    "a {} on a plain background",
)

# "a"/"an" directly before the placeholder, as a whole word.
_ARTICLE_BEFORE_SLOT = re.compile(r"\b([Aa])(n?) \{\}")
# Words starting with a vowel letter that take "a" (a consonant sound), and the reverse.
_A_EXCEPTIONS = ("uni", "use", "usu", "eu", "one", "once", "ufo", "ukulele")
_AN_EXCEPTIONS = ("hour", "honest", "honor", "honour", "heir")


def article_for(phrase: str) -> str:
    """ "a" or "an" for a noun phrase, by its first sound (a spelling heuristic)."""
    word = phrase.strip().lower()
    if word.startswith(_AN_EXCEPTIONS):
        return "an"
    if word.startswith(_A_EXCEPTIONS):
        return "a"
    if len(word) == 1 or (len(word) > 1 and not word[1].isalpha()):  # letters and digits: "an 8", "an x"
        return "an" if word[0] in "aefhilmnorsx8" else "a"
    return "an" if word[:1] in "aeiou" else "a"


def format_caption(template: str, phrase: str) -> str:
    """``template.format(phrase)`` with the article before ``{}`` made to agree with ``phrase``."""
    if "{}" not in template:
        raise ValueError(f"caption template {template!r} has no '{{}}' placeholder for the class phrase")

    def fix(m: re.Match) -> str:
        article = article_for(phrase)
        return (article.capitalize() if m.group(1) == "A" else article) + " {}"

    return _ARTICLE_BEFORE_SLOT.sub(fix, template).replace("{}", phrase, 1)


def phrases_from_names(names: Sequence[str]) -> tuple[tuple[str, ...], ...]:
    """One phrase per class from dataset class names: ``"ankle_boot"`` -> ``("ankle boot",)``."""
    return tuple((str(n).replace("_", " ").strip(),) for n in names)


def _as_phrases(phrases) -> tuple[tuple[str, ...], ...]:
    out = []
    for p in phrases:
        out.append((p,) if isinstance(p, str) else tuple(p))
    return tuple(out)


def caption_for(
    label: int,
    template_index: int = 0,
    *,
    phrase_index: int = 0,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    phrases: Sequence[str | Sequence[str]] = CLASS_PHRASES,
) -> str:
    """The caption of class ``label`` with template ``template_index`` and phrase ``phrase_index``
    (both taken modulo their counts). Defaults: Fashion-MNIST phrases and :data:`DEFAULT_TEMPLATES`."""
    phrases = _as_phrases(phrases)
    if not 0 <= int(label) < len(phrases):
        raise ValueError(f"label {label} out of range for {len(phrases)} classes")
    options = phrases[int(label)]
    return format_caption(templates[template_index % len(templates)], options[phrase_index % len(options)])


def check_templates(templates: Sequence[str], what: str) -> tuple[str, ...]:
    """``templates`` as a tuple if it is a non-empty sequence of strings with a ``{}`` placeholder, else a
    one-line ValueError naming ``what`` (the config key)."""
    templates = tuple(templates)
    if not templates or any(not isinstance(t, str) or "{}" not in t for t in templates):
        raise ValueError(f"{what} must be strings with a '{{}}' placeholder, got {templates!r}")
    return templates


def class_prompts(
    template_index: int = 0,
    *,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    phrases: Sequence[str | Sequence[str]] = CLASS_PHRASES,
) -> list[str]:
    """One prompt per class (canonical phrase, one template), in label order, e.g. for sample grids."""
    return [
        caption_for(label, template_index, templates=templates, phrases=phrases)
        for label in range(len(phrases))
    ]


class LabelCaptioner:
    """Picks a caption for a label with a ``np.random.Generator``: a uniform template, then a uniform
    phrase of that class. All captions are formatted once, up front."""

    def __init__(self, phrases: Sequence[str | Sequence[str]], templates: Sequence[str] = DEFAULT_TEMPLATES):
        phrases = _as_phrases(phrases)
        templates = tuple(templates)
        if not templates:
            raise ValueError("data.caption_templates is empty: give at least one template with '{}'")
        if not phrases or any(not p for p in phrases):
            raise ValueError("every class needs at least one caption phrase")
        self.phrases = phrases
        self.templates = templates
        self._captions = [[[format_caption(t, p) for p in ps] for ps in phrases] for t in templates]

    @property
    def num_classes(self) -> int:
        return len(self.phrases)

    def all_captions(self, label: int) -> list[str]:
        """Every caption the captioner can give for ``label``."""
        return [c for per_template in self._captions for c in per_template[int(label)]]

    def pick(self, label: int, u_template: float, u_phrase: float) -> str:
        """The caption for uniforms in [0, 1) choosing the template and the phrase."""
        label = int(label)
        if not 0 <= label < self.num_classes:
            raise ValueError(f"label {label} out of range for {self.num_classes} class names")
        per_label = self._captions[min(int(u_template * len(self.templates)), len(self.templates) - 1)][label]
        return per_label[min(int(u_phrase * len(per_label)), len(per_label) - 1)]

    def __call__(self, label: int, rng: np.random.Generator) -> str:
        label = int(label)
        if not 0 <= label < self.num_classes:
            raise ValueError(f"label {label} out of range for {self.num_classes} class names")
        t = int(rng.integers(len(self.templates)))
        options = self._captions[t][label]
        return options[int(rng.integers(len(options)))] if len(options) > 1 else options[0]

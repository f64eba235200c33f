"""`ConceptPair`: the concept to remove and what the image should read as without it.

The engine knows labels and prompt templates, not a domain: the templates come with the pair (the
embedded world's are `dit_lens.world.domain.ENDOSCOPY_CONTEXTS`).

Examples:
    >>> pair = ConceptPair("polyps", "normal cecum", contexts=("An image of {}", "A photo of {}"))
    >>> pair.name, pair.source_prompt, pair.negative()
    ('polyps -> normal cecum', 'An image of polyps', ['An image of normal cecum', 'A photo of normal cecum'])
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["ConceptPair"]


@dataclass(frozen=True)
class ConceptPair:
    """Remove `source` so the image reads as `target` (e.g. polyps → normal cecum).

    Attributes:
        source: Class label of the concept to remove (the prompt that is steered).
        target: Class label without it (the negative prompts, and the re-prompting target).
        contexts: Prompt templates varied when computing the vector ("{}" is the label).
        prompt: The template of the generation prompt (default: the first context).
    """

    source: str
    target: str
    contexts: tuple[str, ...]
    prompt: str | None = None

    def __post_init__(self) -> None:
        if not self.source or not self.target or self.source == self.target:
            raise ValueError(f"a ConceptPair needs two different labels, got {self.source!r}, {self.target!r}")
        if isinstance(self.contexts, str) or not self.contexts:
            raise ValueError(f"ConceptPair.contexts is a non-empty list of prompt templates, got {self.contexts!r}")
        object.__setattr__(self, "contexts", tuple(self.contexts))
        if self.prompt is None:
            object.__setattr__(self, "prompt", self.contexts[0])
        for template in (*self.contexts, self.prompt):
            if not isinstance(template, str) or template.count("{}") != 1:
                raise ValueError(f"prompt template {template!r} must contain exactly one '{{}}'")

    @property
    def name(self) -> str:
        return f"{self.source} -> {self.target}"  # ASCII: a coordinate value users type in sel()

    @property
    def source_prompt(self) -> str:
        return self.prompt.format(self.source)

    @property
    def target_prompt(self) -> str:
        return self.prompt.format(self.target)

    def positive(self) -> list[str]:
        return [c.format(self.source) for c in self.contexts]

    def negative(self) -> list[str]:
        return [c.format(self.target) for c in self.contexts]

    def to_dict(self) -> dict:
        return {**asdict(self), "contexts": list(self.contexts)}

    @classmethod
    def from_dict(cls, data: dict) -> "ConceptPair":
        return cls(**data)

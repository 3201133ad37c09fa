"""The zoo: tiny MoE language models trained here, on CPU, in minutes, on invented facts.

A base model learns a few hundred subjects' facts from plain sentences; a tuned model continues
from it on a question/answer rendering of the same facts. Both are saved in the published
per-expert layout beside the facts (for interventions) and calibration text.

>>> from moelens import zoo
>>> z = zoo.build(small=True)          # cached after the first call
>>> z.base, z.tuned, z.facts, z.info["base"]["recall"]
"""

from moelens.zoo.build import Zoo, build, cache_root, default_zoo_dir, load_zoo
from moelens.zoo.models import FAMILIES
from moelens.zoo.recipe import RECIPE_VERSION, Recipe, recipe_for

__all__ = ["FAMILIES", "RECIPE_VERSION", "Recipe", "Zoo", "build", "cache_root", "default_zoo_dir", "load_zoo", "recipe_for"]

"""The token vocabulary: special ids, one block of ids per modality, and the type ids.

`VocabLayout` fixes where each modality's ids start, so that a token's modality and
type follow from its id alone. The sequence builder, the model's embedding sizes,
the codebooks and the losses' vocabulary slices all read it, so it depends on no
other module of the family.
"""

from typing import Any

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Int

from transforms.validation import check_size, typechecked


PAD = 0
"""Padding token id (0): ignored by every loss; only as a suffix of a sequence."""
BOS = 1
"""Beginning-of-sequence token id (1)."""
EOS = 2
"""End-of-sequence token id (2)."""
SEP = 3
"""Separator token id (3), between the modality segments of a sequence."""
MISS = 4
"""Missing-value token id (4): a scalar or spectrum entry without a value."""
N_SPECIAL = 5

SPECIAL_TYPE = 0
IMAGE_TYPE = 1
SCALAR_TYPE = 2
SPECTRUM_TYPE = 3  # group g has type SPECTRUM_TYPE + g


class VocabLayout(eqx.Module):
    """The token vocabulary: specials, then image, scalar and spectrum-group blocks.

    Token ids are laid out as

    | ids | meaning | type id |
    | --- | --- | --- |
    | `0..4` | `PAD, BOS, EOS, SEP, MISS` | 0 (special) |
    | `5 .. 5+n_image` | image codebook entries | 1 |
    | next `n_scalar` | scalar bins (shared by all columns) | 2 |
    | next `n_spectrum` per group `g` | spectrum group `g`'s codebook | `3 + g` |

    so every token's modality, and its type id, follow from its id alone and type
    ids never collide. `MISS` marks a missing value; the sequence builder gives it
    the type of the segment it stands in.

    **Arguments:**

    - `n_image`: image codebook size `V_img`.
    - `n_scalar`: number of scalar bins `V_sca`.
    - `n_spectrum`: codebook size `V_spec` of each spectrum group.
    - `spectrum_groups`: names of the spectrum groups, e.g. `("bp", "rp")`; each
        gets its own block of ids and its own codebook.

    **Raises:**

    `ValueError` for non-positive sizes or duplicate group names.
    """

    n_image: int = eqx.field(static=True)
    n_scalar: int = eqx.field(static=True)
    n_spectrum: int = eqx.field(static=True)
    spectrum_groups: tuple[str, ...] = eqx.field(static=True, converter=tuple)

    def __check_init__(self):
        for name in ("n_image", "n_scalar", "n_spectrum"):
            check_size("VocabLayout", name, getattr(self, name))
        if len(set(self.spectrum_groups)) != len(self.spectrum_groups):
            raise ValueError(
                "VocabLayout: `spectrum_groups` has duplicate names: "
                f"{self.spectrum_groups}."
            )
        if not all(isinstance(g, str) and g for g in self.spectrum_groups):
            raise ValueError(
                "VocabLayout: `spectrum_groups` must be non-empty strings, got "
                f"{self.spectrum_groups}."
            )

    @property
    def n_groups(self) -> int:
        """Number of spectrum groups."""
        return len(self.spectrum_groups)

    @property
    def image_start(self) -> int:
        """First image token id."""
        return N_SPECIAL

    @property
    def scalar_start(self) -> int:
        """First scalar token id."""
        return N_SPECIAL + self.n_image

    def spectrum_start(self, group: int) -> int:
        """First token id of spectrum group `group` (an index into the groups)."""
        if not 0 <= group < self.n_groups:
            raise ValueError(
                f"VocabLayout.spectrum_start: `group` must be in [0, {self.n_groups}), "
                f"got {group}."
            )
        return N_SPECIAL + self.n_image + self.n_scalar + group * self.n_spectrum

    @property
    def vocab_size(self) -> int:
        """Total number of token ids."""
        return (
            N_SPECIAL + self.n_image + self.n_scalar + self.n_groups * self.n_spectrum
        )

    @property
    def n_types(self) -> int:
        """Number of type ids: special, image, scalar and one per spectrum group."""
        return SPECTRUM_TYPE + self.n_groups

    def slices(self) -> dict[str, tuple[int, int]]:
        """`{name: (start, stop)}` for `"image"`, `"scalar"` and every spectrum group
        (named `"spectrum:<group>"`)."""
        out = {
            "image": (self.image_start, self.scalar_start),
            "scalar": (self.scalar_start, self.scalar_start + self.n_scalar),
        }
        for g, name in enumerate(self.spectrum_groups):
            start = self.spectrum_start(g)
            out[f"spectrum:{name}"] = (start, start + self.n_spectrum)
        return out

    def type_ids(self, tokens: Int[Array, "*shape"]) -> Int[Array, "*shape"]:
        """The type id each token's id implies (specials, including `MISS`, get 0).

        **Arguments:**

        - `tokens`: token ids, any shape.

        **Returns:**

        Type ids of the same shape, `int32`.
        """
        return _type_ids(self, tokens)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable description (stored in checkpoints)."""
        return {
            "n_special": N_SPECIAL,
            "n_image": self.n_image,
            "n_scalar": self.n_scalar,
            "n_spectrum": self.n_spectrum,
            "spectrum_groups": list(self.spectrum_groups),
            "vocab_size": self.vocab_size,
            "n_types": self.n_types,
        }


@typechecked
def _type_ids(
    layout: VocabLayout, tokens: Int[Array, "*shape"]
) -> Int[Array, "*shape"]:
    return implied_types(layout, jnp.asarray(tokens), jnp)


def implied_types(layout: VocabLayout, tokens, xp):
    """`VocabLayout.type_ids` in the array namespace `xp` (`jnp`, or `np` for the
    eager checks of concrete ids)."""
    spectrum_start = layout.scalar_start + layout.n_scalar
    group = (tokens - spectrum_start) // layout.n_spectrum
    types = xp.where(tokens >= spectrum_start, SPECTRUM_TYPE + group, SPECIAL_TYPE)
    types = xp.where(tokens < spectrum_start, SCALAR_TYPE, types)
    types = xp.where(tokens < layout.scalar_start, IMAGE_TYPE, types)
    types = xp.where(tokens < N_SPECIAL, SPECIAL_TYPE, types)
    return types.astype(xp.int32)

"""EoMT mask-annealing schedule against every start/end table of the official configs
(docs/eomt.md, "Annealing schedule")."""
import jax
import numpy as np
import pytest

from jaxseg.methods.eomt.annealing import mask_annealing_probs, mask_annealing_windows

# (total optimizer steps T, L2) -> (starts, ends); T is 6 x the first start of each table.
OFFICIAL = {
    (88692, 4): ([14782, 29564, 44346, 59128], [29564, 44346, 59128, 73910]),  # COCO, ViT-L 12 ep
    (88692, 3): ([14782, 36955, 59128], [29564, 51737, 73910]),  # COCO, ViT-S/B 12 ep
    (177384, 3): ([29564, 73910, 118256], [59128, 103474, 147820]),  # COCO, ViT-S/B 24 ep
    (88692, 5): ([14782, 25869, 36955, 48042, 59128], [29564, 40651, 51737, 62824, 73910]),  # COCO g
    (39120, 4): ([6520, 13040, 19560, 26080], [13040, 19560, 26080, 32600]),  # ADE20K, ViT-L
    (39120, 5): ([6520, 11410, 16300, 21190, 26080], [13040, 17930, 22820, 27710, 32600]),  # ADE20K g
    (19902, 4): ([3317, 6634, 9951, 13268], [6634, 9951, 13268, 16585]),  # Cityscapes, ViT-L
}


@pytest.mark.parametrize("total,blocks", sorted(OFFICIAL))
def test_windows_reproduce_official_tables(total, blocks):
    assert mask_annealing_windows(total, blocks) == OFFICIAL[(total, blocks)]


def test_probabilities_follow_the_poly_rule():
    starts, ends = OFFICIAL[(88692, 4)]
    probs = jax.jit(lambda t: mask_annealing_probs(t, starts, ends))
    np.testing.assert_array_equal(probs(0), [1, 1, 1, 1])
    np.testing.assert_array_equal(probs(14781), [1, 1, 1, 1])
    np.testing.assert_array_equal(probs(29564), [0, 1, 1, 1])
    np.testing.assert_array_equal(probs(88691), [0, 0, 0, 0])
    midway = (14782 + 29564) // 2
    expected = (1 - (midway - 14782) / (29564 - 14782)) ** 0.9
    np.testing.assert_allclose(probs(midway), [expected, 1, 1, 1], rtol=1e-6)
    # DINOv3-style explicit lists (first block anneals during warm-up) are accepted as they are.
    np.testing.assert_allclose(mask_annealing_probs(1500, [0, 29564], [3000, 44346]),
                               [0.5 ** 0.9, 1.0], rtol=1e-6)
    with pytest.raises(ValueError, match="starts < ends"):
        mask_annealing_probs(0, [10, 20], [10, 30])
    with pytest.raises(ValueError, match="total_steps >= 6"):
        mask_annealing_windows(3, 4)


def test_probabilities_are_non_increasing_in_the_step():
    starts, ends = mask_annealing_windows(1000, 4)
    values = np.stack([mask_annealing_probs(t, starts, ends) for t in range(0, 1000, 7)])
    assert np.all(np.diff(values, axis=0) <= 0)
    assert values[0].tolist() == [1, 1, 1, 1] and values[-1].tolist() == [0, 0, 0, 0]
